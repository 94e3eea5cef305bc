--! include: codec context periods events write_phase views
-- delete_budget: removes a budget; what it counted stays charged.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor, budget_id, by (optional)
-- Returns: {budget = budget view of the removed budget}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local acct = load_account(ctx, check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX))
  local id = check_str(req.budget_id, 'budget_id', BUDGET_ID_BYTES_MAX)
  local by = check_by(req.by)
  local budget = acct.budgets[id]
  if budget == nil then raise('NOT_FOUND', 'budget_id', 'budget ' .. id .. ' not found') end
  touch(ctx)
  acct.budgets[id] = nil
  emit(ctx, ENTRY.PLAN_CHANGE, {budget_id = id, budget_deleted = 1, by = by})
  commit_ctx(ctx)
  return {budget = budget_view(id, budget)}
end)
