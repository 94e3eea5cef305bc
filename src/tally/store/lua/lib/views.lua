--! include: books
-- views: what scripts answer about grants, balances and accounts.

local function grant_view(g)
  return {grant_id = g.id, kind = g.kind, granted = g.granted, remaining = g.remaining,
    expires_at = g.expires_at, granted_at = g.granted_at, reference = g.reference}
end

local function balance_view(ctx)
  local acct = ctx.acct
  local grants = {}
  for _, g in ipairs(acct.grants) do grants[#grants + 1] = grant_view(g) end
  return {account_id = acct.id, available = available(acct), held = acct.held, grants = grants,
    overage_used = acct.overage_used, overage_held = acct.overage_held,
    overage_limit = acct.overage_limit, period_start = acct.period_start,
    period_end = acct.period_end, period_consumed = acct.period_consumed,
    auto_purchased = acct.auto_purchased, total_granted = acct.total_granted,
    period_purchased = acct.period_purchased, period_expired = acct.period_expired,
    total_charged = acct.total_charged, total_refunded = acct.total_refunded,
    total_expired = acct.total_expired, as_of = ctx.now}
end

local function account_view(acct)
  return {account_id = acct.id, allotment = acct.allotment, policy = acct.policy,
    overage_limit = acct.overage_limit, labels = acct.labels, ap_units = acct.ap_units,
    ap_threshold = acct.ap_threshold, anchor_day = acct.anchor_day, created_at = acct.created_at,
    period_start = acct.period_start, period_end = acct.period_end, alerts = acct.alerts,
    budgets = acct.budgets}
end
