--! include: codec books events
-- alerts: threshold alerts, each raised once per period: percent of the
-- allotment used (holds included), available below a floor, overage started.

local function current_allotment(acct)
  for _, g in ipairs(acct.grants) do
    if g.kind == 'ALLOTMENT' and g.expires_at == acct.period_end then return g end
  end
  return nil
end

local function fire(ctx, name, units)
  if ctx.acct.fired[name] then return end
  ctx.acct.fired[name] = true
  emit(ctx, ENTRY.ALERT, {alert = name, units = units})
end

local function check_alerts(ctx)
  local acct = ctx.acct
  local alerts = acct.alerts
  local allotment = current_allotment(acct)
  if allotment and allotment.granted > 0 then
    local used = allotment.granted - allotment.remaining
    for _, percent in ipairs(alerts.percent) do
      if used * 100 >= percent * allotment.granted then
        fire(ctx, 'allotment_used_' .. int_text(percent), used)
      end
    end
  end
  if alerts.below > 0 and available(acct) < alerts.below then
    fire(ctx, 'balance_below_' .. int_text(alerts.below), available(acct))
  end
  if alerts.overage and acct.overage_used + acct.overage_held > 0 then
    fire(ctx, 'overage_started', acct.overage_used + acct.overage_held)
  end
end
