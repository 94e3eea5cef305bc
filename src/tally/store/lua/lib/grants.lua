--! include: codec context
-- grants: the account's credit buckets, in consumption order, and the moves
-- of units between them and holds or charges.
-- A move {g = grant id, n = units, e = the grant's expiry, k = its kind,
-- r = units refunded from it so far} records where units came from, so they
-- can go back to the same grant.

local KIND_RANK = {ALLOTMENT = 1, PROMOTIONAL = 2, PURCHASE = 3}

-- Consumption order: the grant that expires first; among equals, allotment
-- before promotional before purchase; then the older one.
local function grant_before(a, b)
  local ea = a.expires_at == 0 and TIMESTAMP_MS_MAX + 1 or a.expires_at
  local eb = b.expires_at == 0 and TIMESTAMP_MS_MAX + 1 or b.expires_at
  if ea ~= eb then return ea < eb end
  if KIND_RANK[a.kind] ~= KIND_RANK[b.kind] then return KIND_RANK[a.kind] < KIND_RANK[b.kind] end
  return a.seq < b.seq
end

local function find_grant(acct, grant_id)
  for _, g in ipairs(acct.grants) do
    if g.id == grant_id then return g end
  end
  return nil
end

local function add_grant(ctx, kind, units, expires_at, reference)
  local acct = ctx.acct
  local grant = {id = 'g' .. int_text(next_seq(acct)), kind = kind, granted = units, remaining = units,
    expires_at = expires_at, granted_at = ctx.now, reference = reference or '', seq = acct.seq}
  acct.grants[#acct.grants + 1] = grant
  table.sort(acct.grants, grant_before)
  return grant
end

-- Takes units from live grants in consumption order; returns the moves and
-- what could not be covered.
local function take(acct, units)
  local moves = {}
  for _, g in ipairs(acct.grants) do
    if units <= 0 then break end
    local n = math.min(g.remaining, units)
    if n > 0 then
      g.remaining = g.remaining - n
      moves[#moves + 1] = {g = g.id, n = n, e = g.expires_at, k = g.kind}
      units = units - n
    end
  end
  return moves, units
end

-- Puts n units back into the grant a move took them from. A grant pruned
-- while exhausted comes back with them; units whose grant has expired since
-- are counted as expired (unused, they would have expired with it).
local function return_units(ctx, mv, n)
  local acct = ctx.acct
  local g = find_grant(acct, mv.g)
  if g then
    g.remaining = g.remaining + n
  elseif mv.e == 0 or mv.e > ctx.now then
    acct.grants[#acct.grants + 1] = {id = mv.g, kind = mv.k, granted = 0, remaining = n,
      expires_at = mv.e, granted_at = ctx.now, reference = 'restored', seq = next_seq(acct)}
    table.sort(acct.grants, grant_before)
  else
    acct.total_expired = acct.total_expired + n
    acct.period_expired = acct.period_expired + n
    return n
  end
  return 0
end

-- Gives up to `units` back to the grants `moves` took them from, newest-taken
-- first, leaving out what earlier refunds gave back (mv.r). A committed
-- charge can be refunded in parts, so its moves keep count (`keep_refunded`);
-- a hold's are given back whole, once. Returns the moves made and the units
-- counted as expired on the way.
local function give_back(ctx, moves, units, keep_refunded)
  local back, lost = {}, 0
  for i = #moves, 1, -1 do
    if units <= 0 then break end
    local mv = moves[i]
    local n = math.min(mv.n - (mv.r or 0), units)
    if n > 0 then
      if keep_refunded then mv.r = (mv.r or 0) + n end
      lost = lost + return_units(ctx, mv, n)
      back[#back + 1] = {g = mv.g, n = n}
      units = units - n
    end
  end
  return back, lost
end

-- Splits a hold's grant moves into the first `units` (charged) and the rest.
local function split_moves(moves, units)
  local charged, rest = {}, {}
  for _, mv in ipairs(moves) do
    local n = math.min(mv.n, units)
    if n > 0 then charged[#charged + 1] = {g = mv.g, n = n, e = mv.e, k = mv.k} end
    if mv.n - n > 0 then rest[#rest + 1] = {g = mv.g, n = mv.n - n, e = mv.e, k = mv.k} end
    units = units - n
  end
  return charged, rest
end
