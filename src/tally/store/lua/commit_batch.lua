--! include: codec batch committing
-- commit_batch: many commits on one shard, each item exactly a commit
-- (lib/committing.lua) with its own answer or error (lib/batch.lua).
-- KEYS: 1 shard expiries zset, 2 shard event stream; then per item: account blob,
--       account holds zset
-- ARGV[1] (msgpack): now, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   items = {account_id, reservation_id, quantity} (1 to BATCH_ITEMS_MAX)
-- Returns: {results = {ok, r (commit.lua's answer), code, field, message, extra}}.

return run(function()
  local req = decode_request()
  return run_items(req, KEYS, 2, 2, function(ctx, item)
    return commit_on(ctx, item)
  end)
end)
