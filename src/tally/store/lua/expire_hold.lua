--! include: codec context holds periods write_phase
-- expire_hold: the reaper's step for one due hold. Brings its account up to
-- now (which expires every due hold of the account, this one included).
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
--   10 the reservation's own key
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor, reservation_id
-- Returns: {expired = number of holds expired by this call}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local rid = check_str(req.reservation_id, 'reservation_id', RESERVATION_ID_BYTES_MAX)
  name_reservation(ctx, rid, KEYS[10])
  check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX)
  local acct = load_blob(ctx.acct_key)
  if acct then adopt_account(ctx, acct) end
  local hold = load_hold(ctx, rid)
  if not acct or not hold or hold.state ~= 'HELD' then
    -- nothing left to expire: drop the stale index entries
    redis.call('ZREM', ctx.expiries_key, rid)
    redis.call('ZREM', ctx.holds_key, rid)
    return {expired = 0}
  end
  if hold.expires_at > ctx.now then
    -- extended since it was indexed: only the index needs the new expiry
    redis.call('ZADD', ctx.expiries_key, hold.expires_at, rid)
    redis.call('ZADD', ctx.holds_key, hold.expires_at, rid)
    return {expired = 0}
  end
  touch(ctx)
  settle_if_due(ctx, hold)
  local expired = 0
  for rid_done in pairs(ctx.dirty) do
    if ctx.holds[rid_done].state == 'EXPIRED' then expired = expired + 1 end
  end
  commit_ctx(ctx)
  return {expired = expired}
end)
