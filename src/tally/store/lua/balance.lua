--! flags: no-writes
--! include: codec context periods views
-- balance: an account's balance and settings as of now, with due holds,
-- expiries and a new period applied in memory (nothing is written).
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor
-- Returns: {account = account view, balance = balance view}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local acct = load_account(ctx, check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX))
  touch(ctx)
  return {account = account_view(acct), balance = balance_view(ctx)}
end)
