--! include: codec calendar context settings periods grants events write_phase views
-- create_account: creates an account and its first period's allotment.
-- KEYS: 1 account blob, 2 account holds zset, 3 shard expiries zset, 4 shard event stream
-- ARGV[1] (msgpack): now, prefix, shard, account_id, allotment, policy,
--   overage_limit, ap_units, ap_threshold, anchor_day (0: today's day), labels,
--   alerts = {percent = {...}, below, overage}
-- Returns: {account = account view, balance = balance view, replayed = bool}.
-- Creating an account that exists with the same settings replays it;
-- different settings are ALREADY_EXISTS.

local SETTINGS = {'allotment', 'policy', 'overage_limit', 'ap_units', 'ap_threshold'}

local function same_map(a, b)
  for k, v in pairs(a) do if b[k] ~= v then return false end end
  for k, v in pairs(b) do if a[k] ~= v then return false end end
  return true
end

local function same_alerts(a, b)
  if a.below ~= b.below or a.overage ~= b.overage or #a.percent ~= #b.percent then return false end
  for i, p in ipairs(a.percent) do if b.percent[i] ~= p then return false end end
  return true
end

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local account_id = check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX)
  check_int(req.allotment, 'monthly_allotment', 0, UNITS_MAX)
  check_int(req.overage_limit, 'overage_limit', 0, UNITS_MAX)
  check_int(req.ap_units, 'auto_purchase_units', 0, UNITS_MAX)
  check_int(req.ap_threshold, 'auto_purchase_threshold', 0, UNITS_MAX)
  check_int(req.anchor_day, 'billing_anchor_day', 0, BILLING_ANCHOR_DAY_MAX)
  check_labels(req.labels, 'labels')
  check_policy(req.policy, req.ap_units)
  local alerts = check_alert_settings(req.alerts or {})
  local existing = load_blob(ctx.acct_key)
  if existing then
    upgrade(existing)
    ctx.acct = existing
    local same = same_map(existing.labels, req.labels) and same_alerts(existing.alerts, alerts)
      and (req.anchor_day == 0 or req.anchor_day == existing.anchor_day)
    for _, name in ipairs(SETTINGS) do
      if existing[name] ~= req[name] then same = false end
    end
    if not same then
      raise('ALREADY_EXISTS', 'account_id', 'account ' .. account_id .. ' exists with other settings')
    end
    touch(ctx)
    return {account = account_view(existing), balance = balance_view(ctx), replayed = true}
  end
  local anchor_day = req.anchor_day
  if anchor_day == 0 then anchor_day = day_of_month(ctx.now) end
  local period_start, period_end = period_bounds(ctx.now, anchor_day)
  local acct = {id = account_id, allotment = req.allotment, policy = req.policy,
    overage_limit = req.overage_limit, ap_units = req.ap_units, ap_threshold = req.ap_threshold,
    anchor_day = anchor_day, labels = req.labels, created_at = ctx.now,
    period_start = period_start, period_end = period_end, period_consumed = 0,
    overage_used = 0, overage_held = 0, auto_purchased = 0, held = 0, seq = 0, event_seq = 0,
    total_granted = 0, total_charged = 0, total_refunded = 0, total_expired = 0, grants = {},
    period_purchased = 0, period_expired = 0, alerts = alerts, fired = {}, budgets = {}}
  ctx.acct = acct
  emit(ctx, 'plan_change', {created = 1, allotment = acct.allotment, policy = acct.policy,
    overage_limit = acct.overage_limit, ap_units = acct.ap_units, ap_threshold = acct.ap_threshold,
    anchor_day = anchor_day, labels = acct.labels})
  if acct.allotment > 0 then
    local g = add_grant(ctx, 'ALLOTMENT', acct.allotment, period_end, '')
    acct.total_granted = acct.allotment
    emit(ctx, 'allotment', {grant_id = g.id, units = acct.allotment,
      period_start = period_start, period_end = period_end})
  end
  commit_ctx(ctx)
  return {account = account_view(acct), balance = balance_view(ctx), replayed = false}
end)
