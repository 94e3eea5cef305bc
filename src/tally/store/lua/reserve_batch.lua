--! include: codec batch reserving
-- reserve_batch: many reserves on one shard, each item exactly a reserve
-- (lib/reserving.lua) with its own answer or error (lib/batch.lua).
-- KEYS: 1 shard expiries zset, 2 shard event stream, 3 shard closings zset, 4 shard
--   fence hash, 5 shard prices hash, 6 shard price history hash;
--   then per item: account blob, account holds zset, the account's two usage
--   counter slots, held reservations hash, idempotency record, the new
--   reservation's key
-- ARGV[1] (msgpack): now, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   idempotency_window_ms, quote_validity_ms,
--   items = {account_id, operation, quantity, idempotency_key, fingerprint, ttl_ms,
--   labels, price_version, reservation_seq} (1 to BATCH_ITEMS_MAX)
-- Returns: {results = {ok, r (reserve.lua's answer), code, field, message, extra}}.

return run(function()
  local req = decode_request()
  return run_items(req, KEYS, 6, 7, function(ctx, item, item_keys)
    return reserve_on(ctx, item, item_keys[6], KEYS[5], KEYS[6], item_keys[7])
  end)
end)
