--! include: codec reservation idempotency periods holds grants budgets usage events views write_phase
-- refunding: a Refund's work on its ctx, from the checks of the request to
-- the answer (refund.lua runs it once, refund_batch.lua once per item).
-- req: the fields of refund.lua's request; record_key: its idempotency record's key;
-- reservation_key: the key of the reservation it names.

local function refund_charge(ctx, hold, units, reason, idem_key)
  local acct = ctx.acct
  local from_overage = math.min(units, hold.overage_charged - hold.overage_refunded)
  local credit = 0
  if from_overage > 0 then
    hold.overage_refunded = hold.overage_refunded + from_overage
    if hold.charge_period == acct.period_start then
      acct.overage_used = acct.overage_used - from_overage
    else
      credit = from_overage
      merge_units(ctx, {kind = 'PROMOTIONAL', units = credit, granted = credit, expires_at = 0,
        reference = 'refund credit', anywhere = true})
    end
  end
  local back, lost = give_back(ctx, hold.charge_moves, units - from_overage, true)
  if hold.charge_period == acct.period_start then
    charge_budgets(ctx, hold.operation, hold.labels, -units)
  end
  count_usage(ctx, hold.charge_period, hold.charged_at, hold.operation, hold.labels, -units, 0, 0)
  hold.refunded = hold.refunded + units
  acct.total_refunded = acct.total_refunded + units
  if hold.charge_period == acct.period_start then
    acct.period_consumed = acct.period_consumed - units
  end
  mark_hold(ctx, hold)
  emit(ctx, ENTRY.REFUND, {reservation_id = hold.id, operation = hold.operation, units = units,
    overage = from_overage, credit = credit, moves = moves_text(back), expired = lost, reason = reason,
    charged_at = hold.charged_at,
    labels = hold.labels, idempotency_key = idem_key})
end

local function refund_on(ctx, req, record_key, reservation_key)
  local rid = open_reservation_on(ctx, req, reservation_key)
  local units = nil
  if req.units ~= nil then units = check_int(req.units, 'units', 1, UNITS_MAX) end
  local reason = check_str(req.reason, 'reason', REASON_BYTES_MAX, true)
  local idem_key = check_str(req.idempotency_key, 'idempotency_key', IDEMPOTENCY_KEY_BYTES_MAX)
  local window_ms = check_int(req.idempotency_window_ms, 'idempotency_window_ms', 1, TIMESTAMP_MS_MAX)
  check_str(req.fingerprint, 'fingerprint', FINGERPRINT_BYTES_MAX)
  local figures = idem_lookup(record_key, req.fingerprint, ctx.now, window_ms)
  if figures then
    touch(ctx)
    return {units_refunded = figures[1], units_refundable = figures[2],
      balance = balance_view(ctx), replayed = true, operation = figures[3]}
  end
  local hold = find_hold(ctx, rid)
  touch(ctx)
  settle_if_due(ctx, hold)
  local refunded = 0
  if hold.state == 'HELD' then
    if units ~= nil and units ~= hold.units then
      raise('FAILED_PRECONDITION', 'units', string.format(
        'a hold is released whole (%d units); commit a smaller quantity instead', hold.units))
    end
    release_hold(ctx, hold, 'RELEASED', ENTRY.RELEASE)
    hold.refunded, refunded = hold.units, hold.units
  elseif hold.state == 'COMMITTED' then
    local refundable = hold.charged - hold.refunded
    if units == nil then units = refundable end
    if units > refundable then
      raise('FAILED_PRECONDITION', 'units', string.format(
        'refund of %d units is more than the %d still refundable', units, refundable))
    end
    if units > 0 then
      refund_charge(ctx, hold, units, reason, idem_key)
      refunded = units
    end
  elseif units ~= nil then
    raise('FAILED_PRECONDITION', 'units', 'reservation ' .. rid .. ' is ' .. string.lower(hold.state)
      .. ' and holds nothing to refund')
  end
  local refundable_after = 0
  if hold.state == 'COMMITTED' then refundable_after = hold.charged - hold.refunded end
  remember(ctx, record_key, req.fingerprint, window_ms, {refunded, refundable_after, hold.operation})
  commit_ctx(ctx)
  return {units_refunded = refunded, units_refundable = refundable_after,
    balance = balance_view(ctx), replayed = false, operation = hold.operation}
end
