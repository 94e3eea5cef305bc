--! include: codec
-- fence: a check that the shard's Redis has not lost writes, before any write.
-- Each shard has a fence hash {epoch, count}: count goes up by one in every write
-- phase that appends events (each event carries it as `fence`); `tally recover`
-- starts a new epoch when it heals the shard from the ledger. The server passes the
-- lowest fence it accepts (fence_floor = {epoch, count}: the highest it saw in its
-- own replies or in the ledger). A fence below it (a wipe, a restart from an older
-- snapshot, a failover to a lagging replica) refuses the call before any write;
-- a missing fence reads as {0, 0}.

-- ctx.fence_key: the shard's fence hash (a declared key);
-- floor: the request's fence_floor (absent: {0, 0}, a floor nothing is below).
local function check_fence(ctx, floor)
  floor = floor or {epoch = 0, count = 0}
  if type(floor) ~= 'table' then raise('INVALID_ARGUMENT', 'fence_floor', 'fence_floor must be a map') end
  local floor_epoch = check_int(floor.epoch, 'fence_floor.epoch', 0, UNITS_MAX)
  local floor_count = check_int(floor.count, 'fence_floor.count', 0, UNITS_MAX)
  local stored = redis.call('HMGET', ctx.fence_key, 'epoch', 'count')
  local epoch, count = tonumber(stored[1]) or 0, tonumber(stored[2]) or 0
  if epoch < floor_epoch or (epoch == floor_epoch and count < floor_count) then
    raise('SHARD_BEHIND', 'shard', string.format(
      'shard %s is behind the ledger: Redis lost writes; run tally recover', ctx.shard))
  end
  run_report.fence = {epoch = epoch, count = count}
end

-- A script that writes to a shard but to no account (the catalog's): the
-- shard's part of a ctx, {prefix, shard, fence_key}, from the request and the
-- shard's fence key, its fence checked.
local function shard_ctx(req, fence_key)
  local ctx = {prefix = check_str(req.prefix, 'prefix', KEY_PREFIX_BYTES_MAX),
    shard = check_str(req.shard, 'shard', SHARD_TAG_BYTES_MAX), fence_key = fence_key}
  check_fence(ctx, req.fence_floor)
  return ctx
end

-- In the write phase: the next count, to be carried by every event of this run.
local function next_fence(ctx)
  local count = redis.call('HINCRBY', ctx.fence_key, 'count', 1)
  run_report.fence.count = count
  return count
end

-- In an account script's write phase: the next count on every event of this run.
local function stamp_fence(ctx)
  local count = next_fence(ctx)
  for _, event in ipairs(ctx.events) do
    event[#event + 1] = 'fence'
    event[#event + 1] = count
  end
end
