--! include: codec context refunding
-- refund: releases a hold (whole), or gives back part or all of a committed
-- charge. Overage of the current period is given back first; overage of a
-- period already invoiced comes back as a PROMOTIONAL credit (every credit in
-- the account's one live credit grant, see merge_units); grant units go
-- back to their grants (counted as expired if the grant has expired since).
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
--   10 the reservation's own key, 11 idempotency record
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor, idempotency_window_ms,
--   reservation_id, units (absent: all that is refundable), reason, idempotency_key,
--   fingerprint
-- Returns: {units_refunded, units_refundable, balance, replayed, operation}.

return run(function()
  local req = decode_request()
  return refund_on(new_ctx(req, KEYS), req, KEYS[11], KEYS[10])
end)
