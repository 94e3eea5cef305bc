--! include: books
-- views: what scripts answer about grants, balances, accounts and budgets,
-- in the contract's names (store/contract.py), read from the stored records
-- (which keep their own names: allotment, policy, ap_units, total_granted, ...).
-- grant view: {grant_id, kind, units_granted, units_remaining, expires_at, granted_at,
--   reference}
-- balance view: {account_id, available, spendable, held, grants, overage_used, overage_held,
--   overage_limit, period_start, period_end, period_consumed, period_purchased,
--   period_expired, auto_purchased, units_granted_total, units_charged_total,
--   units_refunded_total, units_expired_total, as_of}
-- account view: {account_id, monthly_allotment, overage_policy, overage_limit, labels,
--   auto_purchase_units, auto_purchase_threshold, billing_anchor_day, created_at,
--   period_start, period_end, alerts, budgets}
-- alert settings: {allotment_used_percent, balance_below, overage_started}
-- budget view: {budget_id, operation, label_key, label_value, limit_units, used_units}

local function grant_view(g)
  return {grant_id = g.id, kind = g.kind, units_granted = g.granted, units_remaining = g.remaining,
    expires_at = g.expires_at, granted_at = g.granted_at, reference = g.reference}
end

local function balance_view(ctx)
  local acct = ctx.acct
  local grants = {}
  for _, g in ipairs(acct.grants) do grants[#grants + 1] = grant_view(g) end
  return {account_id = acct.id, available = available(acct), spendable = spendable(acct),
    held = acct.held, grants = grants,
    overage_used = acct.overage_used, overage_held = acct.overage_held,
    overage_limit = acct.overage_limit, period_start = acct.period_start,
    period_end = acct.period_end, period_consumed = acct.period_consumed,
    auto_purchased = acct.auto_purchased, units_granted_total = acct.total_granted,
    period_purchased = acct.period_purchased, period_expired = acct.period_expired,
    units_charged_total = acct.total_charged, units_refunded_total = acct.total_refunded,
    units_expired_total = acct.total_expired, as_of = ctx.now}
end

local function alerts_view(alerts)
  return {allotment_used_percent = alerts.percent, balance_below = alerts.below,
    overage_started = alerts.overage}
end

local function budget_view(id, budget)
  return {budget_id = id, operation = budget.operation, label_key = budget.label_key,
    label_value = budget.label_value, limit_units = budget.limit, used_units = budget.used}
end

-- The account's budgets as views, by id.
local function budget_views(acct)
  local ids = {}
  for id in pairs(acct.budgets) do ids[#ids + 1] = id end
  table.sort(ids)
  local views = {}
  for i, id in ipairs(ids) do views[i] = budget_view(id, acct.budgets[id]) end
  return views
end

local function account_view(acct)
  return {account_id = acct.id, monthly_allotment = acct.allotment, overage_policy = acct.policy,
    overage_limit = acct.overage_limit, labels = acct.labels,
    auto_purchase_units = acct.ap_units, auto_purchase_threshold = acct.ap_threshold,
    billing_anchor_day = acct.anchor_day, created_at = acct.created_at,
    period_start = acct.period_start, period_end = acct.period_end,
    alerts = alerts_view(acct.alerts), budgets = budget_views(acct)}
end
