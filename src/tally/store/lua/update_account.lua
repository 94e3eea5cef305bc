--! include: codec context settings periods events write_phase views
-- update_account: changes an account's plan, overage settings or labels.
-- A new allotment applies from the next billing period.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   set = {monthly_allotment, overage_policy, overage_limit, auto_purchase_units,
--   auto_purchase_threshold, labels, merge_labels, alerts} (each optional; labels and
--   alerts replace, merge_labels adds or changes labels), by (optional)
-- Returns: {account = account view, balance = balance view}.

-- The settings a request may change as {request name, stored name} (the
-- stored name is also the plan_change event's), in the order they are applied.
local CHANGEABLE = {{'monthly_allotment', 'allotment'}, {'overage_policy', 'policy'},
  {'overage_limit', 'overage_limit'}, {'auto_purchase_units', 'ap_units'},
  {'auto_purchase_threshold', 'ap_threshold'}, {'labels', 'labels'}, {'alerts', 'alerts'}}

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local acct = load_account(ctx, check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX))
  local set = req.set
  if type(set) ~= 'table' then raise('INVALID_ARGUMENT', 'request', 'set must be a map') end
  for _, field in ipairs({'monthly_allotment', 'overage_limit', 'auto_purchase_units',
                          'auto_purchase_threshold'}) do
    if set[field] ~= nil then check_int(set[field], field, 0, UNITS_MAX) end
  end
  local by = check_by(req.by)
  local labels = set.labels
  if labels ~= nil then check_labels(labels, 'labels') end
  if set.merge_labels ~= nil then
    check_labels(set.merge_labels, 'labels')
    labels = {}
    for k, val in pairs(acct.labels) do labels[k] = val end
    for k, val in pairs(set.merge_labels) do labels[k] = val end
  end
  local stored = {}
  for _, names in ipairs(CHANGEABLE) do stored[names[2]] = set[names[1]] end
  stored.labels = labels
  if set.alerts ~= nil then stored.alerts = check_alert_settings(set.alerts) end
  check_policy(stored.policy or acct.policy, stored.ap_units or acct.ap_units)
  touch(ctx)
  local changed = {}
  for _, names in ipairs(CHANGEABLE) do
    local name = names[2]
    if stored[name] ~= nil then
      acct[name] = stored[name]
      changed[name] = stored[name]
    end
  end
  if next(changed) ~= nil then
    changed.by = by
    emit(ctx, ENTRY.PLAN_CHANGE, changed)
    commit_ctx(ctx)
  end
  return {account = account_view(acct), balance = balance_view(ctx)}
end)
