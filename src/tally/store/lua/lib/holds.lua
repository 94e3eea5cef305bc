--! include: codec keys grants budgets events
-- holds: reservation records. One copy of each per script run, so every
-- change lands on it; changed ones are marked and written by commit_ctx.
-- A closed one stays in Redis for the closed window after its last change
-- (kept_until, by the clock; Redis' PX removes it later); after that it is
-- not in Redis for the scripts, and the ledger's image of it is brought back
-- (restore_hold) when it is needed again.

-- Whether a record is still in Redis for the scripts at `now`.
local function hold_kept(hold, now)
  return hold.state == 'HELD' or hold.kept_until > now
end

local function load_hold(ctx, rid)
  local hold = ctx.holds[rid]
  if hold == nil then
    hold = load_blob(reservation_key(ctx.prefix, rid)) or false
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
-- record's bytes.
local function keep_closed(ctx, rid, hold)
  if ctx.closed_window_ms < 1 then error('closed_window_ms is required to close a hold', 0) end
  hold.kept_until = ctx.now + ctx.closed_window_ms
  return save_blob(reservation_key(ctx.prefix, rid), hold, ctx.closed_window_ms)
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
      packed = save_blob(reservation_key(ctx.prefix, rid), hold)
      redis.call('ZADD', ctx.holds_key, hold.expires_at, rid)
      redis.call('ZADD', ctx.expiries_key, hold.expires_at, rid)
    else
      packed = keep_closed(ctx, rid, hold)
      redis.call('ZREM', ctx.holds_key, rid)
      redis.call('ZREM', ctx.expiries_key, rid)
    end
    entries[#entries + 1] = cmsgpack.pack(rid)
    entries[#entries + 1] = packed
  end
  if #entries == 0 then return nil end
  return packed_map(entries)
end
