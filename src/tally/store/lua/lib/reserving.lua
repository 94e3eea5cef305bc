--! include: codec spend budgets holds events views idempotency write_phase
-- reserving: a Reserve's work on its ctx, from the checks of the request to
-- the answer (reserve.lua runs it once, reserve_batch.lua once per item).
-- req: the fields of reserve.lua's request; the keys of the item's idempotency
-- record, of the shard's prices and price history, and of the new reservation.

local function reserve_on(ctx, req, record_key, prices_key, history_key, reservation_key)
  local spend = check_spend_request(req)
  local ttl_ms = check_int(req.ttl_ms, 'ttl', 1, TIMESTAMP_MS_MAX)
  spend.ttl_ms = ttl_ms
  local replay, hold, moves, short = open_spend(ctx, spend, record_key, prices_key, history_key,
    reservation_key)
  if replay then return replay end
  local acct, units = ctx.acct, hold.units
  hold.budgets = apply_budgets(ctx, spend.operation, spend.labels, units)
  hold.moves, hold.overage, hold.expires_at = moves, short, ctx.now + ttl_ms
  acct.held = acct.held + units
  acct.overage_held = acct.overage_held + short
  mark_hold(ctx, hold)
  emit(ctx, ENTRY.RESERVE, {reservation_id = hold.id, operation = hold.operation,
    quantity = hold.quantity, units = units, overage = short, moves = moves_text(moves),
    labels = hold.labels, idempotency_key = spend.idem_key, price_version = hold.price_version,
    expires_at = hold.expires_at})
  remember(ctx, record_key, spend.fingerprint, spend.window_ms, spend_figures(hold, nil))
  commit_ctx(ctx)
  return {reservation_id = hold.id, units = units, expires_at = hold.expires_at,
    balance = balance_view(ctx), replayed = false, price_version = hold.price_version,
    units_per_quantity = hold.unit_price, quantity = hold.quantity}
end
