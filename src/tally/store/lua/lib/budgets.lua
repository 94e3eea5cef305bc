--! include: codec
-- budgets: spend limits per period on one operation or one label value.
-- A budget's `used` is what was charged in its scope this period, net of
-- refunds, plus what open holds made while it existed set aside. Charges and
-- refunds count against every budget in scope; holds against the budgets they
-- were checked against (hold.budgets).

local function budget_applies(budget, operation, labels)
  if budget.operation ~= '' then return budget.operation == operation end
  return labels[budget.label_key] == budget.label_value
end

local function check_budgets(ctx, operation, labels, units)
  for id, budget in pairs(ctx.acct.budgets) do
    if budget_applies(budget, operation, labels) and budget.used + units > budget.limit then
      local left = math.max(0, budget.limit - budget.used)
      raise('RESOURCE_EXHAUSTED', 'budget', string.format(
        'budget %s allows %d units per period: %d used or held, %d required',
        id, budget.limit, budget.used, units),
        {available = left, required = units, account_id = ctx.acct.id,
         operation = operation, budget_id = id})
    end
  end
end

-- Counts a hold against the budgets in scope; returns their ids (hold.budgets).
local function apply_budgets(ctx, operation, labels, units)
  local applied = {}
  for id, budget in pairs(ctx.acct.budgets) do
    if budget_applies(budget, operation, labels) then
      budget.used = budget.used + units
      applied[#applied + 1] = id
    end
  end
  return applied
end

-- Counts a charge (units > 0) or a refund (units < 0) against the budgets in scope.
local function charge_budgets(ctx, operation, labels, units)
  for _, budget in pairs(ctx.acct.budgets) do
    if budget_applies(budget, operation, labels) then
      budget.used = math.max(0, budget.used + units)
    end
  end
end

-- Gives a hold's units back to the budgets it counted against, if still the same period.
local function release_budgets(ctx, hold, units)
  if hold.budget_period ~= ctx.acct.period_start or units <= 0 then return end
  for _, id in ipairs(hold.budgets or {}) do
    local budget = ctx.acct.budgets[id]
    if budget then budget.used = math.max(0, budget.used - units) end
  end
end
