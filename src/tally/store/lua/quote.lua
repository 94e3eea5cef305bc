--! flags: no-writes
--! include: codec context pricing periods books allocation
-- quote: the exact cost of an operation now and whether the account could
-- pay it (auto-purchases included); moves nothing.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
--   10 shard prices hash, 11 shard price history hash
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor, operation,
--   quantity (>= 1)
-- Returns: {units, units_per_quantity, price_version, affordable, available}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local acct = load_account(ctx, check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX))
  local operation = check_str(req.operation, 'operation', OPERATION_BYTES_MAX)
  local quantity = check_int(req.quantity, 'quantity', 1, UNITS_MAX)
  local unit_price, version = price_of(ctx, KEYS[10], KEYS[11], operation, 0)
  local units = units_for(unit_price, quantity)
  touch(ctx)
  local spendable_now = spendable(acct)
  auto_purchase(ctx, units)
  return {units = units, units_per_quantity = unit_price, price_version = version,
    affordable = units <= spendable(acct), available = spendable_now}
end)
