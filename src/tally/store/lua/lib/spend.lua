--! include: codec keys context idempotency pricing periods budgets allocation views holds
-- spend: the opening reserve and charge share, from the checks of the
-- request to the units set aside for a new hold.

-- The checks shared by reserve and charge; returns the decoded fields.
local function check_spend_request(req)
  return {
    account_id = check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX),
    operation = check_str(req.operation, 'operation', OPERATION_BYTES_MAX),
    quantity = check_int(req.quantity, 'quantity', 1, UNITS_MAX),
    idem_key = check_str(req.idempotency_key, 'idempotency_key', IDEMPOTENCY_KEY_BYTES_MAX),
    price_version = check_int(req.price_version, 'price_version', 0, UNITS_MAX),
    labels = check_labels(req.labels, 'labels'),
    window_ms = check_int(req.idempotency_window_ms, 'idempotency_window_ms', 1, TIMESTAMP_MS_MAX),
    fingerprint = check_str(req.fingerprint, 'fingerprint', FINGERPRINT_BYTES_MAX),
    reservation_seq = check_int(req.reservation_seq, 'reservation_seq', 1, UNITS_MAX),
  }
end

-- A new reservation record, HELD or already COMMITTED by the caller, under the
-- id the store made (spend.reservation_seq) and the key it declared for it. An
-- id already taken (two servers made the same one) is refused, worth a retry
-- (it makes a new one).
local function new_hold(ctx, spend, unit_price, price_version, units, key)
  local acct = ctx.acct
  local seq = spend.reservation_seq
  local rid = reservation_id_for(ctx.shard, seq, acct.id)
  if redis.call('HEXISTS', ctx.held_key, rid) == 1 or redis.call('EXISTS', key) == 1 then
    raise('UNAVAILABLE', 'reservation_id', 'reservation id ' .. rid .. ' is taken; retry')
  end
  name_reservation(ctx, rid, key)
  if seq > acct.rid_seq then acct.rid_seq = seq end
  return {id = rid, seq = seq,
    operation = spend.operation, quantity = spend.quantity, unit_price = unit_price,
    price_version = price_version, units = units, overage = 0, moves = {}, labels = spend.labels,
    state = 'HELD', expires_at = 0, charged = 0, charged_quantity = 0, overage_charged = 0, overage_refunded = 0, refunded = 0,
    charge_moves = {}, charge_period = 0, late = false, charged_at = 0,
    budgets = {}, budget_period = acct.period_start}
end

-- The figures an idempotency record keeps of a reserve or charge; the rest of
-- the answer is the request's (the same request: its fingerprint matched).
-- (overage: a charge's units beyond the grants; nil for a reserve).
local function spend_figures(hold, overage)
  return {hold.seq, hold.unit_price, hold.price_version, overage}
end

-- A reserve's or charge's answer to a replay (the fields of both: each reply
-- takes its own), from those figures and the time they were stored (a hold
-- expires ttl_ms after it). The balance is the account's as of now (touched
-- in memory, nothing is written).
local function spend_replay(ctx, spend, figures, at)
  local seq, unit_price, price_version, overage = unpack(figures)
  touch(ctx)
  return {reservation_id = reservation_id_for(ctx.shard, seq, ctx.acct.id),
    units = unit_price * spend.quantity, balance = balance_view(ctx), replayed = true,
    price_version = price_version, units_per_quantity = unit_price, quantity = spend.quantity,
    expires_at = at + (spend.ttl_ms or 0), overage_units = overage or 0}
end

-- After the script's own checks of `spend` (check_spend_request): loads the
-- account, replays an earlier answer under the idempotency key, prices the
-- operation, brings the account up to now, checks budgets and sets the units
-- aside, reading the idempotency record and the shard's prices and price history.
-- Returns the answer to replay, or nil, the new hold, its grant moves and the
-- units not covered by grants (overage). reservation_key: the new hold's key.
local function open_spend(ctx, spend, record_key, prices_key, history_key, reservation_key)
  load_account(ctx, spend.account_id)
  local figures, at = idem_lookup(record_key, spend.fingerprint, ctx.now, spend.window_ms)
  if figures then return spend_replay(ctx, spend, figures, at) end
  local unit_price, version = price_of(ctx, prices_key, history_key, spend.operation,
    spend.price_version)
  local units = units_for(unit_price, spend.quantity)
  touch(ctx)
  check_budgets(ctx, spend.operation, spend.labels, units)
  local moves, short = allocate(ctx, spend.operation, units)
  return nil, new_hold(ctx, spend, unit_price, version, units, reservation_key), moves, short
end
