--! include: codec calendar context settings periods grants events write_phase views
-- create_account: creates an account and its first period's allotment.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor, monthly_allotment,
--   overage_policy, overage_limit, auto_purchase_units, auto_purchase_threshold,
--   billing_anchor_day (0: today's day), labels,
--   alerts = {allotment_used_percent, balance_below, overage_started}, by (optional)
-- Returns: {account = account view, balance = balance view, replayed = bool}.
-- Creating an account that exists with the same settings replays it;
-- different settings are ALREADY_EXISTS.

-- The settings compared on a repeated create: request name -> stored name.
local SETTINGS = {monthly_allotment = 'allotment', overage_policy = 'policy',
  overage_limit = 'overage_limit', auto_purchase_units = 'ap_units',
  auto_purchase_threshold = 'ap_threshold'}

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
  check_int(req.monthly_allotment, 'monthly_allotment', 0, UNITS_MAX)
  check_int(req.overage_limit, 'overage_limit', 0, UNITS_MAX)
  check_int(req.auto_purchase_units, 'auto_purchase_units', 0, UNITS_MAX)
  check_int(req.auto_purchase_threshold, 'auto_purchase_threshold', 0, UNITS_MAX)
  local anchor_day = check_int(req.billing_anchor_day, 'billing_anchor_day', 0,
    BILLING_ANCHOR_DAY_MAX)
  check_labels(req.labels, 'labels')
  check_policy(req.overage_policy, req.auto_purchase_units)
  local alerts = check_alert_settings(req.alerts or {})
  local by = check_by(req.by)
  local existing = load_blob(ctx.acct_key)
  if existing then
    adopt_account(ctx, existing)
    local same = same_map(existing.labels, req.labels) and same_alerts(existing.alerts, alerts)
      and (anchor_day == 0 or anchor_day == existing.anchor_day)
    for name, stored in pairs(SETTINGS) do
      if existing[stored] ~= req[name] then same = false end
    end
    if not same then
      raise('ALREADY_EXISTS', 'account_id', 'account ' .. account_id .. ' exists with other settings')
    end
    touch(ctx)
    return {account = account_view(existing), balance = balance_view(ctx), replayed = true}
  end
  if anchor_day == 0 then anchor_day = day_of_month(ctx.now) end
  local period_start, period_end = period_bounds(ctx.now, anchor_day)
  local acct = {id = account_id, allotment = req.monthly_allotment, policy = req.overage_policy,
    overage_limit = req.overage_limit, ap_units = req.auto_purchase_units,
    ap_threshold = req.auto_purchase_threshold,
    anchor_day = anchor_day, labels = req.labels, created_at = ctx.now, clock = ctx.now,
    period_start = period_start, period_end = period_end, period_consumed = 0,
    overage_used = 0, overage_held = 0, auto_purchased = 0, held = 0, seq = 0, event_seq = 0,
    total_granted = 0, total_charged = 0, total_refunded = 0, total_expired = 0, grants = {},
    period_purchased = 0, period_expired = 0, alerts = alerts, fired = {}, budgets = {}}
  ctx.acct = acct
  emit(ctx, ENTRY.PLAN_CHANGE, {created = 1, allotment = acct.allotment, policy = acct.policy,
    overage_limit = acct.overage_limit, ap_units = acct.ap_units, ap_threshold = acct.ap_threshold,
    anchor_day = anchor_day, labels = acct.labels, by = by})
  if acct.allotment > 0 then
    local g = add_grant(ctx, 'ALLOTMENT', acct.allotment, period_end, '')
    acct.total_granted = acct.allotment
    emit(ctx, ENTRY.ALLOTMENT, {grant_id = g.id, units = acct.allotment,
      period_start = period_start, period_end = period_end})
  end
  commit_ctx(ctx)
  return {account = account_view(acct), balance = balance_view(ctx), replayed = false}
end)
