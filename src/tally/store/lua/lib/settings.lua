--! include: codec
-- settings: checks of an account's settings (create_account, update_account).

local POLICIES = {DENY = true, ALLOW = true, AUTO_PURCHASE = true}

local function check_policy(policy, ap_units)
  if not POLICIES[policy] then
    raise('INVALID_ARGUMENT', 'overage_policy', 'overage_policy must be DENY, ALLOW or AUTO_PURCHASE')
  end
  if policy == 'AUTO_PURCHASE' and ap_units <= 0 then
    raise('INVALID_ARGUMENT', 'auto_purchase_units', 'auto_purchase_units must be positive for AUTO_PURCHASE')
  end
end

-- Alert settings as requested ({allotment_used_percent, balance_below,
-- overage_started}) to the account's stored shape ({percent, below, overage}).
local function check_alert_settings(alerts)
  if type(alerts) ~= 'table' then raise('INVALID_ARGUMENT', 'alerts', 'alerts must be a map') end
  local percent = alerts.allotment_used_percent or {}
  if type(percent) ~= 'table' or #percent > ALERT_PERCENTAGES_MAX then
    raise('INVALID_ARGUMENT', 'alerts.allotment_used_percent',
      string.format('at most %d percentages', ALERT_PERCENTAGES_MAX))
  end
  for _, p in ipairs(percent) do
    check_int(p, 'alerts.allotment_used_percent', ALERT_PERCENT_MIN, ALERT_PERCENT_MAX)
  end
  return {percent = percent,
    below = check_int(alerts.balance_below or 0, 'alerts.balance_below', 0, UNITS_MAX),
    overage = alerts.overage_started == true}
end
