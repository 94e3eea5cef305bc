--! include: codec context reserving
-- reserve: holds units for one operation until commit, refund or expiry.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
--   10 idempotency record, 11 shard prices hash, 12 shard price history hash,
--   13 the new reservation's key (its id made by the store: reservation_seq)
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   idempotency_window_ms, quote_validity_ms,
--   operation, quantity (>= 1), idempotency_key, fingerprint, ttl_ms, labels,
--   price_version (0: current), reservation_seq (the new id's sequence)
-- Returns: {reservation_id, units, expires_at, balance, replayed, price_version,
--   units_per_quantity, quantity};
--   RESOURCE_EXHAUSTED carries {available, required, account_id, operation, budget_id?}.

return run(function()
  local req = decode_request()
  return reserve_on(new_ctx(req, KEYS), req, KEYS[10], KEYS[11], KEYS[12], KEYS[13])
end)
