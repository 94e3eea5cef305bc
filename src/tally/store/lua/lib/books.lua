--! include: codec
-- books: the account's figures, the invariant that they balance, and the
-- bound on every running total.

local function grants_remaining(acct)
  local sum = 0
  for _, g in ipairs(acct.grants) do sum = sum + g.remaining end
  return sum
end

-- Available counts overage (used and held) as negative, per the design notes.
local function available(acct)
  return grants_remaining(acct) - acct.overage_used - acct.overage_held
end

-- What the account may still spend, overage headroom included.
local function spendable(acct)
  if acct.policy == 'ALLOW' then
    return grants_remaining(acct) + math.max(0, acct.overage_limit - acct.overage_used - acct.overage_held)
  end
  return math.max(0, available(acct))
end

-- Asserts the account's books balance; a failure is a bug, so it crashes
-- the script before it writes anything. Returns the available units checked.
local function assert_books(acct)
  local lhs = acct.total_granted
  local available_units = available(acct)
  -- summed so that no partial sum leaves [available, granted]: every figure is
  -- exact below 2^53, a larger partial sum (charged + available) would round
  local rhs = available_units + acct.held + (acct.total_charged - acct.total_refunded)
    + acct.total_expired
  if lhs ~= rhs then
    error(string.format('books out of balance for %s: granted %d ~= %d', acct.id, lhs, rhs), 0)
  end
  for _, g in ipairs(acct.grants) do
    if g.remaining < 0 then error('negative grant ' .. g.id .. ' on ' .. acct.id, 0) end
  end
  return available_units
end

-- Every running total an account keeps, by the name its figure has in replies.
local RUNNING_TOTALS = {
  {'total_granted', 'units_granted_total'}, {'total_charged', 'units_charged_total'},
  {'total_refunded', 'units_refunded_total'}, {'total_expired', 'units_expired_total'},
  {'period_consumed', 'period_consumed'}, {'period_purchased', 'period_purchased'},
  {'period_expired', 'period_expired'}, {'auto_purchased', 'auto_purchased'},
  {'overage_used', 'overage_used'}, {'held', 'held'}, {'overage_held', 'overage_held'},
  {'seq', 'seq'}, {'event_seq', 'event_seq'},
}

-- Refuses a change that takes a running total (of the account, a grant or a
-- budget) past UNITS_MAX: beyond it Lua's numbers lose units and Redis would
-- write them in exponent form. Called before anything is written.
local function check_running_totals(acct)
  local function refuse(name)
    raise('FAILED_PRECONDITION', 'account_id', string.format(
      'account %s: %s would pass %d (2^53 - 1); nothing was changed', acct.id, name, UNITS_MAX))
  end
  for _, total in ipairs(RUNNING_TOTALS) do
    if acct[total[1]] > UNITS_MAX then refuse(total[2]) end
  end
  for _, g in ipairs(acct.grants) do
    if g.granted > UNITS_MAX or g.remaining > UNITS_MAX then refuse('grant ' .. g.id) end
  end
  for id, budget in pairs(acct.budgets) do
    if budget.used > UNITS_MAX then refuse('budget ' .. id) end
  end
end
