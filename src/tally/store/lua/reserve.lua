--! include: codec context reserving
-- reserve: holds units for one operation until commit, refund or expiry.
-- KEYS: 1 account blob, 2 account holds zset, 3 shard expiries zset,
--       4 shard event stream, 5 idempotency record, 6 shard prices hash,
--       7 shard price history hash
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   idempotency_window_ms, quote_validity_ms,
--   operation, quantity (>= 1), idempotency_key, fingerprint, ttl_ms, labels,
--   price_version (0: current)
-- Returns: {reservation_id, units, expires_at, balance, replayed, price_version,
--   units_per_quantity, quantity};
--   RESOURCE_EXHAUSTED carries {available, required, account_id, operation, budget_id?}.

return run(function()
  local req = decode_request()
  return reserve_on(new_ctx(req, KEYS), req, KEYS[5], KEYS[6], KEYS[7])
end)
