--! include: codec context spend budgets usage holds events views idempotency write_phase
-- charge: reserves and commits in one step.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
--   10 idempotency record, 11 shard prices hash, 12 shard price history hash,
--   13 the new reservation's key (its id made by the store: reservation_seq)
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   idempotency_window_ms, quote_validity_ms,
--   operation, quantity (>= 1), idempotency_key, fingerprint, labels,
--   price_version (0: current), reservation_seq (the new id's sequence)
-- Returns: {reservation_id, units, balance, replayed, price_version, overage_units};
--   RESOURCE_EXHAUSTED carries {available, required, account_id, operation, budget_id?}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local spend = check_spend_request(req)
  local replay, hold, moves, short = open_spend(ctx, spend, KEYS[10], KEYS[11], KEYS[12], KEYS[13])
  if replay then return replay end
  local acct, units, version = ctx.acct, hold.units, hold.price_version
  charge_budgets(ctx, spend.operation, spend.labels, units)
  hold.state, hold.closed_at, hold.charged_at = 'COMMITTED', ctx.now, ctx.now
  count_usage(ctx, acct.period_start, ctx.now, spend.operation, spend.labels, units,
    spend.quantity, 1)
  hold.charged, hold.charged_quantity, hold.charge_moves = units, spend.quantity, moves
  hold.overage_charged, hold.charge_period = short, acct.period_start
  acct.overage_used = acct.overage_used + short
  acct.total_charged = acct.total_charged + units
  acct.period_consumed = acct.period_consumed + units
  mark_hold(ctx, hold)
  emit(ctx, ENTRY.CHARGE, {reservation_id = hold.id, operation = hold.operation,
    quantity = hold.quantity, units = units, overage = short, moves = moves_text(moves),
    labels = hold.labels, idempotency_key = spend.idem_key, price_version = version})
  remember(ctx, KEYS[10], spend.fingerprint, spend.window_ms, spend_figures(hold, short))
  commit_ctx(ctx)
  return {reservation_id = hold.id, units = units, balance = balance_view(ctx),
    replayed = false, price_version = version, overage_units = short}
end)
