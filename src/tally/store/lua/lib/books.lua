-- books: the account's figures, and the invariant that they balance.

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
  local rhs = available_units + acct.held + acct.total_charged - acct.total_refunded + acct.total_expired
  if lhs ~= rhs then
    error(string.format('books out of balance for %s: granted %d ~= %d', acct.id, lhs, rhs), 0)
  end
  for _, g in ipairs(acct.grants) do
    if g.remaining < 0 then error('negative grant ' .. g.id .. ' on ' .. acct.id, 0) end
  end
  return available_units
end
