--! include: calendar grants holds events
-- periods: brings an account up to the script's clock (touch): due holds
-- expire, grants expire, a new billing period rolls in with its allotment.

local function expire_due_holds(ctx)
  local due = redis.call('ZRANGEBYSCORE', ctx.holds_key, '-inf', ctx.now, 'LIMIT', 0, LAZY_EXPIRIES_MAX)
  for _, rid in ipairs(due) do
    local hold = load_hold(ctx, rid)
    if hold and hold.state == 'HELD' and hold.expires_at <= ctx.now then
      release_hold(ctx, hold, 'EXPIRED', ENTRY.EXPIRE)
    elseif hold and hold.state == 'HELD' then
      -- extended since it was indexed; commit_ctx re-indexes it
      mark_hold(ctx, hold)
    end
  end
end

local function expire_grants(ctx)
  local acct = ctx.acct
  local live = {}
  for _, g in ipairs(acct.grants) do
    if g.expires_at ~= 0 and g.expires_at <= ctx.now then
      acct.total_expired = acct.total_expired + g.remaining
      acct.period_expired = acct.period_expired + g.remaining
      local units = g.remaining
      g.remaining = 0
      emit(ctx, g.kind == 'ALLOTMENT' and ENTRY.ALLOTMENT_EXPIRE or ENTRY.GRANT_EXPIRE,
        {grant_id = g.id, units = units, grant_kind = g.kind})
    else
      live[#live + 1] = g
    end
  end
  acct.grants = live
end

local function roll_period(ctx)
  local acct = ctx.acct
  if ctx.now < acct.period_end then return end
  if acct.overage_used > 0 then
    -- Overage of the closed period is invoiced: it becomes granted (paid) units.
    acct.total_granted = acct.total_granted + acct.overage_used
    local units = acct.overage_used
    acct.overage_used = 0
    emit(ctx, ENTRY.OVERAGE, {units = units, period_start = acct.period_start, period_end = acct.period_end})
  end
  -- Exhausted grants leave the account at the period's end (a refund brings
  -- a still-valid one back); the number of live grants stays bounded.
  local live = {}
  for _, g in ipairs(acct.grants) do
    if g.remaining > 0 then live[#live + 1] = g end
  end
  acct.grants = live
  acct.period_start, acct.period_end = period_bounds(ctx.now, acct.anchor_day)
  acct.period_consumed = 0
  acct.auto_purchased = 0
  acct.period_purchased = 0
  acct.period_expired = 0
  acct.fired = {}
  for _, budget in pairs(acct.budgets) do budget.used = 0 end
  if acct.allotment > 0 then
    local g = merge_units(ctx, {kind = 'ALLOTMENT', units = acct.allotment, granted = acct.allotment,
      expires_at = acct.period_end, reference = '', anywhere = true})
    acct.total_granted = acct.total_granted + acct.allotment
    emit(ctx, ENTRY.ALLOTMENT, {grant_id = g.id, units = acct.allotment,
      period_start = acct.period_start, period_end = acct.period_end})
  end
end

-- Brings the account up to ctx.now: due holds expire, grants expire, a new
-- period's allotment appears. In memory only, like every other change.
local function touch(ctx)
  expire_due_holds(ctx)
  expire_grants(ctx)
  roll_period(ctx)
end
