--! include: codec context
-- grants: the account's credit buckets, in consumption order, and the moves
-- of units between them and holds or charges.
-- A move {g = grant id, n = units, e = the grant's expiry, k = its kind,
-- r = units refunded from it so far} records where units came from, so they
-- can go back to the same grant.

local KIND_RANK = {ALLOTMENT = 1, PROMOTIONAL = 2, PURCHASE = 3}

-- Consumption order: the grant that expires first; among equals, allotment
-- before promotional before purchase; then the older one.
-- An expiry as a number to compare: a grant that never expires (0) comes last.
local function expiry_rank(expires_at)
  return expires_at == 0 and TIMESTAMP_MS_MAX + 1 or expires_at
end

local function grant_before(a, b)
  local ea, eb = expiry_rank(a.expires_at), expiry_rank(b.expires_at)
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

-- A new grant; its caller has made sure the account has room (GRANTS_MAX).
-- `id` names a grant coming back (restored), otherwise a new id is drawn.
local function add_grant(ctx, kind, units, expires_at, reference, granted, id)
  local acct = ctx.acct
  if #acct.grants >= GRANTS_MAX then error('grant beyond GRANTS_MAX on ' .. acct.id, 0) end
  local seq = next_seq(acct)
  local grant = {id = id or 'g' .. int_text(seq), kind = kind, granted = granted or units,
    remaining = units, expires_at = expires_at, granted_at = ctx.now, reference = reference or '',
    seq = seq}
  acct.grants[#acct.grants + 1] = grant
  table.sort(acct.grants, grant_before)
  return grant
end

-- Room for one more grant: below GRANTS_MAX, or once an exhausted grant
-- (other than the period's allotment, which the period summary reads) has left
-- the account, as exhausted grants do at a period's end; a refund naming it
-- later finds it gone and merges like one.
local function room_for_grant(acct)
  if #acct.grants < GRANTS_MAX then return true end
  for i, g in ipairs(acct.grants) do
    if g.remaining == 0 and g.kind ~= 'ALLOTMENT' then
      table.remove(acct.grants, i)
      return true
    end
  end
  return false
end

-- Units every path but a customer's purchase adds (auto-purchased packs, a
-- refund's credit, restored units, a period's allotment), so that live grants
-- stay within GRANTS_MAX whatever the account's history. They join the first
-- live grant, in consumption order, of the same kind and expiry (and
-- `reference`, unless it is nil); else a new grant while there is room;
-- else, at GRANTS_MAX with every grant holding units, the first grant that
-- expires no earlier (units never expire sooner than they would have), or,
-- when `anywhere`, the grant that expires last. `granted` is what the grant's
-- units_granted gains (0 for units coming back); `id` names a new grant.
-- Returns the grant that took the units, or nil (nothing changed).
local function merge_units(ctx, spec)
  local acct = ctx.acct
  for _, g in ipairs(acct.grants) do
    if g.kind == spec.kind and g.expires_at == spec.expires_at
        and (spec.reference == nil or g.reference == spec.reference) then
      g.granted, g.remaining = g.granted + spec.granted, g.remaining + spec.units
      return g
    end
  end
  if room_for_grant(acct) then
    return add_grant(ctx, spec.kind, spec.units, spec.expires_at, spec.reference or spec.new_reference,
      spec.granted, spec.id)
  end
  local target = nil
  for _, g in ipairs(acct.grants) do
    if expiry_rank(g.expires_at) >= expiry_rank(spec.expires_at) then target = g break end
  end
  if target == nil and spec.anywhere then target = acct.grants[#acct.grants] end
  if target then target.granted, target.remaining = target.granted + spec.granted, target.remaining + spec.units end
  return target
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

-- Puts n units back into the grant a move took them from. A grant gone
-- (exhausted, it left the account) while still valid: the units join a live
-- grant of its kind and expiry, or it comes back with them (merge_units).
-- Units whose grant has expired since are counted as expired (unused, they
-- would have expired with it). Returns the units counted as expired and the
-- id of the grant that took the units.
local function return_units(ctx, mv, n)
  local acct = ctx.acct
  local g = find_grant(acct, mv.g)
  if g then
    g.remaining = g.remaining + n
    return 0, g.id
  elseif mv.e == 0 or mv.e > ctx.now then
    g = merge_units(ctx, {kind = mv.k, units = n, granted = 0, expires_at = mv.e,
      new_reference = 'restored', id = mv.g, anywhere = true})
    return 0, g.id
  end
  acct.total_expired = acct.total_expired + n
  acct.period_expired = acct.period_expired + n
  return n, mv.g
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
      local expired, receiver = return_units(ctx, mv, n)
      lost = lost + expired
      back[#back + 1] = {g = receiver, n = n}
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
