--! include: codec grants budgets events
-- holds: reservation records. One copy of each per script run, so every
-- change lands on it; changed ones are marked and written by commit_ctx.
-- Every key a script touches is one it declared, so a record lives where the
-- script can name it:
--   held     the account's hash of held reservations (ctx.held_key, rid -> record):
--            touch expires due holds of the account that no request named;
--   own key  a closed reservation's, kept for the closed window after its last
--            change (kept_until, by the clock; Redis' PX removes it later),
--            written by the script whose request named the reservation (its key
--            is in ctx.reservation_keys). A hold expired by a script that did not
--            name it stays in the held hash, closed, with its entry in the
--            shard's expiries: the reaper's expire_hold, naming it, moves it.
-- Past its closed window a record is not in Redis for the scripts, and the
-- ledger's image of it is brought back (restore_hold) when it is needed again.

-- The key of the reservation the request names (a declared key).
local function name_reservation(ctx, rid, key)
  ctx.reservation_keys[rid] = key
end

-- Whether a record is still in Redis for the scripts at `now`.
local function hold_kept(hold, now)
  return hold.state == 'HELD' or hold.kept_until > now
end

-- A closed record still in the held hash, moved to its own key (declared: `key`)
-- for what is left of its closed window. The record does not change, so this
-- needs no event (the ledger has its image from the event that closed it).
local function move_closed(ctx, rid, hold, raw, key)
  redis.call('HDEL', ctx.held_key, rid)
  redis.call('ZREM', ctx.expiries_key, rid)
  local left = hold.kept_until - ctx.now
  if left > 0 then redis.call('SET', key, raw, 'PX', left) end
end

-- The record of a reservation, from the held hash or, when the request named
-- it, its own key. A closed one found in the held hash moves to its own key.
local function read_hold(ctx, rid)
  local raw = redis.call('HGET', ctx.held_key, rid)
  local key = ctx.reservation_keys[rid]
  if raw then
    local hold = cmsgpack.unpack(raw)
    if hold.state ~= 'HELD' and key then move_closed(ctx, rid, hold, raw, key) end
    return hold
  end
  if not key then return nil end
  local hold = load_blob(key)
  -- held under its own key: kept so by an earlier release; moved into the held
  -- hash when written (write_holds)
  if hold and hold.state == 'HELD' then ctx.legacy_keys[rid] = key end
  return hold
end

local function load_hold(ctx, rid)
  local hold = ctx.holds[rid]
  if hold == nil then
    hold = read_hold(ctx, rid) or false
    if hold and not hold_kept(hold, ctx.now) then hold = false end
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
  -- an expired hold closed when it expired, whenever a script noticed
  hold.closed_at = state == 'EXPIRED' and hold.expires_at or ctx.now
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

-- A closed hold's record, kept for the closed window from now; returns the
-- record's bytes. Its own key when the request named it (`key`); else it stays
-- in the held hash, its shard expiries entry (due) left for the reaper.
local function keep_closed(ctx, rid, hold, key)
  if ctx.closed_window_ms < 1 then error('closed_window_ms is required to close a hold', 0) end
  hold.kept_until = ctx.now + ctx.closed_window_ms
  if not key then
    local packed = cmsgpack.pack(hold)
    redis.call('HSET', ctx.held_key, rid, packed)
    return packed
  end
  redis.call('HDEL', ctx.held_key, rid)
  redis.call('ZREM', ctx.expiries_key, rid)
  return save_blob(key, hold, ctx.closed_window_ms)
end

-- Part of the write phase: writes the marked holds and their index entries
-- (open holds by expiry; closed ones for the closed window). Returns their
-- images, the msgpack map {rid -> hold} made of the bytes written (each hold
-- packed once), or nil when no hold changed.
local function write_holds(ctx)
  local entries = {}
  for rid in pairs(ctx.dirty) do
    local hold = ctx.holds[rid]
    local packed
    if hold.state == 'HELD' then
      packed = cmsgpack.pack(hold)
      redis.call('HSET', ctx.held_key, rid, packed)
      if ctx.legacy_keys[rid] then redis.call('DEL', ctx.legacy_keys[rid]) end
      redis.call('ZADD', ctx.holds_key, hold.expires_at, rid)
      redis.call('ZADD', ctx.expiries_key, hold.expires_at, rid)
    else
      packed = keep_closed(ctx, rid, hold, ctx.reservation_keys[rid])
      redis.call('ZREM', ctx.holds_key, rid)
    end
    entries[#entries + 1] = cmsgpack.pack(rid)
    entries[#entries + 1] = packed
  end
  if #entries == 0 then return nil end
  return packed_map(entries)
end
