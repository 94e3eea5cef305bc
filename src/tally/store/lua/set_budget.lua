--! include: codec context periods usage events write_phase views
-- set_budget: sets a spend limit per billing period on one operation or one
-- label value. A new budget starts from the units already charged this period
-- in its scope as the usage counters know them (usage_in_scope: units counted
-- under the other label set are not known by label value, so a label budget
-- does not start from them; holds made before it existed do not count against
-- it). From then on every charge counts against it by its own labels, tracked
-- or not.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor, operation, label_key,
--   label_value, limit_units, by (optional)
-- Returns: {budget = budget view}.

local function charged_so_far(ctx, budget)
  return math.max(0, usage_in_scope(counters_of(ctx.usage_keys, ctx.acct.period_start), budget))
end

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local acct = load_account(ctx, check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX))
  local operation = check_str(req.operation, 'budget.operation', OPERATION_BYTES_MAX, true)
  local label_key = check_str(req.label_key, 'budget.label_key', LABEL_KEY_BYTES_MAX, true)
  local label_value = check_str(req.label_value, 'budget.label_value', LABEL_VALUE_BYTES_MAX, true)
  local limit = check_int(req.limit_units, 'budget.limit_units', 0, UNITS_MAX)
  local by = check_by(req.by)
  if (operation == '') == (label_key == '') then
    raise('INVALID_ARGUMENT', 'budget', 'a budget names either an operation or a label_key')
  end
  local id = 'operation:' .. operation
  if operation == '' then id = 'label:' .. label_key .. '=' .. label_value end
  touch(ctx)
  local budget = acct.budgets[id]
  if budget == nil then
    local count = 0
    for _ in pairs(acct.budgets) do count = count + 1 end
    if count >= BUDGETS_MAX then
      raise('FAILED_PRECONDITION', 'budget', string.format('at most %d budgets per account', BUDGETS_MAX))
    end
    budget = {operation = operation, label_key = label_key, label_value = label_value, limit = limit}
    budget.used = charged_so_far(ctx, budget)
    acct.budgets[id] = budget
  end
  budget.limit = limit
  emit(ctx, ENTRY.PLAN_CHANGE, {budget_id = id, budget_limit = limit, by = by})
  commit_ctx(ctx)
  return {budget = budget_view(id, budget)}
end)
