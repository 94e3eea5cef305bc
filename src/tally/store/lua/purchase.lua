--! include: codec context idempotency periods grants events write_phase views
-- purchase: adds a PURCHASE grant bought by the customer.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
--   10 idempotency record
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor, idempotency_window_ms,
--   units, expires_at (0: never), reference, idempotency_key, fingerprint, by (optional)
-- Returns: {grant = grant view, balance = balance view, replayed = bool}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local acct = load_account(ctx, check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX))
  local units = check_int(req.units, 'units', 1, UNITS_MAX)
  local expires_at = check_int(req.expires_at, 'expires_at', 0, TIMESTAMP_MS_MAX)
  local reference = check_str(req.reference, 'reference', REFERENCE_BYTES_MAX, true)
  local idem_key = check_str(req.idempotency_key, 'idempotency_key', IDEMPOTENCY_KEY_BYTES_MAX)
  local window_ms = check_int(req.idempotency_window_ms, 'idempotency_window_ms', 1, TIMESTAMP_MS_MAX)
  check_str(req.fingerprint, 'fingerprint', FINGERPRINT_BYTES_MAX)
  local by = check_by(req.by)
  local figures, at = idem_lookup(KEYS[10], req.fingerprint, ctx.now, window_ms)
  if figures then
    -- the grant as it was bought (the request's own figures), the balance as of now
    touch(ctx)
    return {grant = {grant_id = figures[1], kind = 'PURCHASE',
      units_granted = units, units_remaining = units, expires_at = expires_at, granted_at = at,
      reference = reference}, balance = balance_view(ctx), replayed = true}
  end
  if expires_at ~= 0 and expires_at <= ctx.now then
    raise('INVALID_ARGUMENT', 'expires_at', 'expires_at must be in the future')
  end
  touch(ctx)
  if acct.total_granted + units > UNITS_MAX then
    raise('INVALID_ARGUMENT', 'units', 'the account would hold more than 2^53 - 1 units')
  end
  if #acct.grants >= GRANTS_MAX then
    raise('FAILED_PRECONDITION', 'account_id',
      string.format('account %s has %d live grants, the maximum', acct.id, GRANTS_MAX))
  end
  local g = add_grant(ctx, 'PURCHASE', units, expires_at, reference)
  acct.total_granted = acct.total_granted + units
  acct.period_purchased = acct.period_purchased + units
  emit(ctx, ENTRY.PURCHASE, {grant_id = g.id, units = units, reference = reference,
    expires_at = expires_at, idempotency_key = idem_key, by = by})
  remember(ctx, KEYS[10], req.fingerprint, window_ms, {g.id})
  commit_ctx(ctx)
  return {grant = grant_view(g), balance = balance_view(ctx), replayed = false}
end)
