--! include: codec batch committing
-- commit_batch: many commits on one shard, each item exactly a commit
-- (lib/committing.lua) with its own answer or error (lib/batch.lua).
-- KEYS: 1 shard expiries zset, 2 shard event stream, 3 shard closings zset, 4 shard
--   fence hash; then per item: account blob, account holds zset, the account's
--   two usage counter slots, held reservations hash, the reservation's own key
-- ARGV[1] (msgpack): now, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   items = {account_id, reservation_id, quantity} (1 to BATCH_ITEMS_MAX)
-- Returns: {results = {ok, r (commit.lua's answer), code, field, message, extra}}.

return run(function()
  local req = decode_request()
  return run_items(req, KEYS, 4, 6, function(ctx, item, item_keys)
    return commit_on(ctx, item, item_keys[6])
  end)
end)
