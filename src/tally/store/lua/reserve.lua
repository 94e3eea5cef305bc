--! include: codec calendar account
-- reserve: holds units for one operation until commit, refund or expiry.
-- KEYS: 1 account blob, 2 account holds zset, 3 shard expiries zset,
--       4 shard event stream, 5 idempotency record, 6 shard prices hash,
--       7 shard price history hash
-- ARGV[1] (msgpack): now, prefix, shard, account_id, operation, quantity (>= 1),
--   idempotency_key, fingerprint, ttl_ms, labels, price_version (0: current),
--   idem_window_ms
-- Returns: {reservation_id, units, expires_at, balance, replayed, price_version,
--   unit_price, quantity}; RESOURCE_EXHAUSTED carries {available, required}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local spend = check_spend_request(req)
  local ttl_ms = check_int(req.ttl_ms, 'ttl', 1, MAX_TIME_MS)
  local acct = load_account(ctx, spend.account_id)
  local replay = idem_lookup(KEYS[5], req.fingerprint, ctx.now)
  if replay then return replay end
  local unit_price, version = price_of(ctx, KEYS[6], KEYS[7], spend.operation, spend.price_version)
  local units = units_for(unit_price, spend.quantity)
  touch(ctx)
  check_budgets(ctx, spend.operation, spend.labels, units)
  local moves, short = allocate(ctx, spend.operation, units)
  local hold = new_hold(ctx, spend, unit_price, version, units)
  hold.budgets = apply_budgets(ctx, spend.operation, spend.labels, units)
  hold.moves, hold.overage, hold.expires_at = moves, short, ctx.now + ttl_ms
  acct.held = acct.held + units
  acct.overage_held = acct.overage_held + short
  mark_hold(ctx, hold)
  emit(ctx, 'reserve', {reservation_id = hold.id, operation = hold.operation,
    quantity = hold.quantity, units = units, overage = short, moves = moves_text(moves),
    labels = hold.labels, idempotency_key = spend.idem_key, price_version = version,
    expires_at = hold.expires_at})
  local answer = {reservation_id = hold.id, units = units, expires_at = hold.expires_at,
    balance = balance_view(ctx), replayed = false, price_version = version,
    unit_price = unit_price, quantity = hold.quantity}
  remember(ctx, KEYS[5], req.fingerprint, answer, spend.window_ms)
  commit_ctx(ctx)
  return answer
end)
