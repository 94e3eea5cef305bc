--! include: codec books grants events
-- allocation: how a spend is covered: from grants, from packs bought on the
-- way (AUTO_PURCHASE), then from overage (ALLOW).

-- AUTO_PURCHASE: packs bought so that, after spending `units`, available
-- stays at or above the threshold, within the per-period cap. They join the
-- account's one live auto-purchase grant (PURCHASE, never expiring); with
-- GRANTS_MAX grants holding units and none never expiring, none are bought.
local function auto_purchase(ctx, units)
  local acct = ctx.acct
  if acct.policy ~= 'AUTO_PURCHASE' or acct.ap_units <= 0 then return end
  local after = available(acct) - units
  if after >= acct.ap_threshold then return end
  local packs = math.ceil((acct.ap_threshold - after) / acct.ap_units)
  local cap_packs = math.floor((acct.overage_limit - acct.auto_purchased) / acct.ap_units)
  packs = math.min(packs, cap_packs, AUTO_PURCHASE_PACKS_MAX)
  if packs <= 0 then return end
  local bought = packs * acct.ap_units
  local g = merge_units(ctx, {kind = 'PURCHASE', units = bought, granted = bought, expires_at = 0,
    reference = 'auto-purchase'})
  if g == nil then return end
  acct.total_granted = acct.total_granted + bought
  acct.auto_purchased = acct.auto_purchased + bought
  acct.period_purchased = acct.period_purchased + bought
  emit(ctx, ENTRY.PURCHASE, {grant_id = g.id, units = bought, auto = 1, packs = packs})
end

local function insufficient(ctx, operation, units, spendable_units)
  local acct = ctx.acct
  raise('RESOURCE_EXHAUSTED', 'quantity',
    string.format('account %s has %d units available, %d required', acct.id, spendable_units, units),
    {available = spendable_units, required = units, account_id = acct.id, operation = operation})
end

-- Sets units aside from grants, then overage (ALLOW), buying packs first
-- (AUTO_PURCHASE). Raises RESOURCE_EXHAUSTED before changing anything if
-- the units cannot be covered.
local function allocate(ctx, operation, units)
  local spendable_before = spendable(ctx.acct)
  auto_purchase(ctx, units)
  if units > spendable(ctx.acct) then insufficient(ctx, operation, units, spendable_before) end
  return take(ctx.acct, units)
end
