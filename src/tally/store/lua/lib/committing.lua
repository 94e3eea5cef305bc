--! include: codec reservation periods holds grants budgets usage events views write_phase
-- committing: a Commit's work on its ctx, from the checks of the request to
-- the answer (commit.lua runs it once, commit_batch.lua once per item).
-- req: the fields of commit.lua's request; the key of the reservation it names.

local function charge_hold(ctx, hold, units)
  local acct = ctx.acct
  local grant_units = hold.units - hold.overage
  local from_grants = math.min(units, grant_units)
  local charged_moves, rest = split_moves(hold.moves, from_grants)
  local _, lost = give_back(ctx, rest, grant_units - from_grants, false)
  acct.held = acct.held - hold.units
  acct.overage_held = acct.overage_held - hold.overage
  return charged_moves, units - from_grants, lost
end

-- reservation_key: the key of the reservation the request names.
local function commit_on(ctx, req, reservation_key)
  local rid = open_reservation_on(ctx, req, reservation_key)
  local acct = ctx.acct
  local quantity = nil
  if req.quantity ~= nil then quantity = check_int(req.quantity, 'quantity', 0, UNITS_MAX) end
  local hold = find_hold(ctx, rid)
  if quantity == nil then quantity = hold.quantity end
  if quantity > hold.quantity then
    raise('INVALID_ARGUMENT', 'quantity',
      string.format('quantity %d is more than the %d reserved', quantity, hold.quantity))
  end
  if hold.state == 'COMMITTED' then
    if hold.charged_quantity ~= quantity then
      raise('FAILED_PRECONDITION', 'quantity', string.format(
        'reservation was already committed with quantity %d', hold.charged_quantity))
    end
    -- the answer again from the hold's own figures, with the balance as of now
    touch(ctx)
    return {units_charged = hold.charged, units_released = hold.late and 0 or hold.units - hold.charged,
      balance = balance_view(ctx), replayed = true, late = hold.late,
      overage_units = hold.overage_charged, operation = hold.operation}
  end
  if hold.state == 'RELEASED' then
    raise('FAILED_PRECONDITION', 'reservation_id', 'reservation ' .. rid .. ' was released')
  end
  touch(ctx)
  settle_if_due(ctx, hold)
  local units = hold.unit_price * quantity
  local moves, overage
  local lost = 0
  local late = hold.state == 'EXPIRED'
  if late then
    moves, overage = take(acct, units)
    charge_budgets(ctx, hold.operation, hold.labels, units)
  else
    moves, overage, lost = charge_hold(ctx, hold, units)
    release_budgets(ctx, hold, hold.units)
    charge_budgets(ctx, hold.operation, hold.labels, units)
  end
  acct.overage_used = acct.overage_used + overage
  acct.total_charged = acct.total_charged + units
  acct.period_consumed = acct.period_consumed + units
  local released = late and 0 or hold.units - units
  hold.state, hold.closed_at, hold.late, hold.charged_at = 'COMMITTED', ctx.now, late, ctx.now
  count_usage(ctx, acct.period_start, ctx.now, hold.operation, hold.labels, units, quantity, 1)
  hold.charged, hold.charged_quantity, hold.charge_moves = units, quantity, moves
  hold.overage_charged, hold.charge_period = overage, acct.period_start
  mark_hold(ctx, hold)
  emit(ctx, late and ENTRY.LATE_COMMIT or ENTRY.COMMIT, {reservation_id = rid, operation = hold.operation,
    quantity = quantity, units = units, released = released, overage = overage,
    moves = moves_text(moves), expired = lost, labels = hold.labels})
  commit_ctx(ctx)
  return {units_charged = units, units_released = released, balance = balance_view(ctx),
    replayed = false, late = late, overage_units = overage, operation = hold.operation}
end
