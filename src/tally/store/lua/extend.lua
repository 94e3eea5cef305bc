--! include: codec reservation periods holds events views write_phase
-- extend: gives a held reservation a new lifetime of ttl_ms from now.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
--   10 the reservation's own key
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor, reservation_id, ttl_ms
-- Returns: {reservation_id, units, expires_at, balance, replayed, price_version,
--   units_per_quantity, quantity}.

return run(function()
  local req = decode_request()
  local ctx, rid = open_reservation(req, KEYS)
  local ttl_ms = check_int(req.ttl_ms, 'ttl', 1, TIMESTAMP_MS_MAX)
  local hold = find_hold(ctx, rid)
  if hold.state == 'HELD' and hold.expires_at <= ctx.now then
    raise('FAILED_PRECONDITION', 'reservation_id', 'reservation ' .. rid .. ' has expired')
  end
  if hold.state ~= 'HELD' then
    raise('FAILED_PRECONDITION', 'reservation_id',
      'reservation ' .. rid .. ' is ' .. string.lower(hold.state) .. ', not held')
  end
  touch(ctx)
  hold.expires_at = ctx.now + ttl_ms
  mark_hold(ctx, hold)
  emit(ctx, ENTRY.EXTEND, {reservation_id = rid, operation = hold.operation, units = 0,
    expires_at = hold.expires_at})
  commit_ctx(ctx)
  return {reservation_id = rid, units = hold.units, expires_at = hold.expires_at,
    balance = balance_view(ctx), replayed = false, price_version = hold.price_version,
    units_per_quantity = hold.unit_price, quantity = hold.quantity}
end)
