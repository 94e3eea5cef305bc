--! include: codec context spend budgets holds events views idempotency write_phase
-- reserve: holds units for one operation until commit, refund or expiry.
-- KEYS: 1 account blob, 2 account holds zset, 3 shard expiries zset,
--       4 shard event stream, 5 idempotency record, 6 shard prices hash,
--       7 shard price history hash
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   idempotency_window_ms, quote_validity_ms,
--   operation, quantity (>= 1), idempotency_key, fingerprint, ttl_ms, labels,
--   price_version (0: current)
-- Returns: {reservation_id, units, expires_at, balance, replayed, price_version,
--   units_per_quantity, quantity};
--   RESOURCE_EXHAUSTED carries {available, required, account_id, operation, budget_id?}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local spend = check_spend_request(req)
  local ttl_ms = check_int(req.ttl_ms, 'ttl', 1, TIMESTAMP_MS_MAX)
  spend.ttl_ms = ttl_ms
  local replay, hold, moves, short = open_spend(ctx, spend, KEYS)
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
  remember(ctx, KEYS[5], spend.fingerprint, spend.window_ms, spend_figures(hold, nil))
  commit_ctx(ctx)
  return {reservation_id = hold.id, units = units, expires_at = hold.expires_at,
    balance = balance_view(ctx), replayed = false, price_version = hold.price_version,
    units_per_quantity = hold.unit_price, quantity = hold.quantity}
end)
