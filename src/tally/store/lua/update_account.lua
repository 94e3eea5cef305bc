--! include: codec context settings periods events write_phase views
-- update_account: changes an account's plan, overage settings or labels.
-- A new allotment applies from the next billing period.
-- KEYS: 1 account blob, 2 account holds zset, 3 shard expiries zset, 4 shard event stream
-- ARGV[1] (msgpack): now, prefix, shard, retention_ms, account_id, set = {allotment?, policy?,
--   overage_limit?, ap_units?, ap_threshold?, labels? (replace), merge_labels? (add or change),
--   alerts? (replace)}
-- Returns: {account = account view, balance = balance view}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local acct = load_account(ctx, check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX))
  local set = req.set
  if type(set) ~= 'table' then raise('INVALID_ARGUMENT', 'request', 'set must be a map') end
  local limits = {allotment = 'monthly_allotment', overage_limit = 'overage_limit',
    ap_units = 'auto_purchase_units', ap_threshold = 'auto_purchase_threshold'}
  for name, field in pairs(limits) do
    if set[name] ~= nil then check_int(set[name], field, 0, UNITS_MAX) end
  end
  if set.labels ~= nil then check_labels(set.labels, 'labels') end
  if set.merge_labels ~= nil then
    check_labels(set.merge_labels, 'labels')
    local merged = {}
    for k, val in pairs(acct.labels) do merged[k] = val end
    for k, val in pairs(set.merge_labels) do merged[k] = val end
    set.labels = merged
  end
  if set.alerts ~= nil then set.alerts = check_alert_settings(set.alerts) end
  local policy = set.policy or acct.policy
  local ap_units = set.ap_units or acct.ap_units
  check_policy(policy, ap_units)
  touch(ctx)
  local changed = {}
  for _, name in ipairs({'allotment', 'policy', 'overage_limit', 'ap_units', 'ap_threshold', 'labels',
                         'alerts'}) do
    if set[name] ~= nil then
      acct[name] = set[name]
      changed[name] = set[name]
    end
  end
  if next(changed) ~= nil then
    emit(ctx, 'plan_change', changed)
    commit_ctx(ctx)
  end
  return {account = account_view(acct), balance = balance_view(ctx)}
end)
