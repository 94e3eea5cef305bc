--! include: codec keys grants budgets events
-- holds: reservation records. One copy of each per script run, so every
-- change lands on it; changed ones are marked and written by commit_ctx.

local function load_hold(ctx, rid)
  local hold = ctx.holds[rid]
  if hold == nil then
    hold = load_blob(reservation_key(ctx.prefix, rid)) or false
    ctx.holds[rid] = hold
  end
  return hold or nil
end

local function mark_hold(ctx, hold)
  ctx.holds[hold.id] = hold
  ctx.dirty[hold.id] = true
end

-- Returns a HELD hold's units to the account (release or expiry).
local function release_hold(ctx, hold, state, event_type)
  local acct = ctx.acct
  local back, lost = give_back(ctx, hold.moves, hold.units - hold.overage, false)
  acct.overage_held = acct.overage_held - hold.overage
  acct.held = acct.held - hold.units
  release_budgets(ctx, hold, hold.units)
  hold.state = state
  hold.closed_at = ctx.now
  mark_hold(ctx, hold)
  emit(ctx, event_type, {reservation_id = hold.id, operation = hold.operation,
    quantity = hold.quantity, units = hold.units, moves = moves_text(back), expired = lost,
    overage = hold.overage, labels = hold.labels})
end

-- Expires a hold whose time has come even when the lazy sweep skipped it.
local function settle_if_due(ctx, hold)
  if hold.state == 'HELD' and hold.expires_at <= ctx.now then
    release_hold(ctx, hold, 'EXPIRED', ENTRY.EXPIRE)
  end
end

-- Part of the write phase: writes the marked holds and their index entries
-- (open holds by expiry; closed ones are kept for retention_ms, refundable).
-- Returns their images {rid -> hold}.
local function write_holds(ctx)
  local images = {}
  for rid in pairs(ctx.dirty) do
    local hold = ctx.holds[rid]
    images[rid] = hold
    if hold.state == 'HELD' then
      save_blob(reservation_key(ctx.prefix, rid), hold)
      redis.call('ZADD', ctx.holds_key, hold.expires_at, rid)
      redis.call('ZADD', ctx.expiries_key, hold.expires_at, rid)
    else
      save_blob(reservation_key(ctx.prefix, rid), hold, ctx.retention_ms)
      redis.call('ZREM', ctx.holds_key, rid)
      redis.call('ZREM', ctx.expiries_key, rid)
    end
  end
  return images
end
