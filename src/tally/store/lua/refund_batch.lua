--! include: codec batch refunding
-- refund_batch: many refunds on one shard, each item exactly a refund
-- (lib/refunding.lua) with its own answer or error (lib/batch.lua).
-- KEYS: 1 shard expiries zset, 2 shard event stream, 3 shard closings zset, 4 shard
--   fence hash; then per item: account blob, account holds zset, the account's
--   two usage counter slots, held reservations hash, the reservation's own key,
--   idempotency record
-- ARGV[1] (msgpack): now, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   idempotency_window_ms,
--   items = {account_id, reservation_id, units, reason, idempotency_key, fingerprint}
--   (1 to BATCH_ITEMS_MAX)
-- Returns: {results = {ok, r (refund.lua's answer), code, field, message, extra}}.

return run(function()
  local req = decode_request()
  return run_items(req, KEYS, 4, 7, function(ctx, item, item_keys)
    return refund_on(ctx, item, item_keys[7], item_keys[6])
  end)
end)
