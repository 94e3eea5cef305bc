--! include: codec context committing
-- commit: charges a hold, whole or for a smaller quantity; the rest goes back
-- to the grants it came from. A hold that expired before the commit is
-- charged anyway (the work was done) from what is available, the rest as
-- overage, and flagged late. Idempotent by reservation id.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
--   10 the reservation's own key
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor, reservation_id,
--   quantity (absent: the whole reserved quantity)
-- Returns: {units_charged, units_released, balance, replayed, late, overage_units,
--   operation}.

return run(function()
  local req = decode_request()
  return commit_on(new_ctx(req, KEYS), req, KEYS[10])
end)
