-- account: the account blob, its grants, open holds and events.
-- Nothing here writes to Redis except commit_ctx(), which a script calls
-- once, after every check has passed ("check everything, then write").
--
-- ctx = {now, prefix, shard, acct, acct_key, holds_key, expiries_key,
--        events_key, events = {}, holds = {rid -> hold loaded},
--        dirty = {rid -> true for holds to write}, retention_ms}

local KIND_RANK = {ALLOTMENT = 1, PROMOTIONAL = 2, PURCHASE = 3}
local USAGE_RETENTION_MS = 62 * 86400000
local check_alerts  -- defined below, used by commit_ctx
local MAX_LAZY_EXPIRIES = 100
local MAX_GRANTS = 1000
local MAX_AUTO_PACKS = 1000

local function new_ctx(req, keys)
  return {
    now = req.now, prefix = check_str(req.prefix, 'prefix', 64),
    shard = check_str(req.shard, 'shard', 16),
    acct_key = keys[1], holds_key = keys[2], expiries_key = keys[3], events_key = keys[4],
    events = {}, holds = {}, dirty = {}, usage = {},
    retention_ms = check_int(req.retention_ms or 0, 'retention_ms', 0, MAX_TIME_MS),
  }
end

-- Fields added after an account was first written get their neutral value.
local function upgrade(acct)
  acct.event_seq = acct.event_seq or 0
  acct.period_purchased = acct.period_purchased or 0
  acct.period_expired = acct.period_expired or 0
  acct.alerts = acct.alerts or {percent = {}, below = 0, overage = false}
  acct.fired = acct.fired or {}
  acct.budgets = acct.budgets or {}
end

local function load_account(ctx, account_id)
  local acct = load_blob(ctx.acct_key)
  if not acct then raise('NOT_FOUND', 'account_id', 'account ' .. account_id .. ' not found') end
  upgrade(acct)
  ctx.acct = acct
  return acct
end

local HOUR_MS = 3600000

-- Usage counters of a billing period, updated in the write phase: per hour
-- bucket, operation and label set, the net units, the quantity and the count
-- of charges. Refunds net out the charge they refund, in its bucket.
local function usage_key(ctx, period_start)
  return ctx.prefix .. 'usage:' .. ctx.acct.id .. ':' .. int_text(period_start)
end

local function labels_signature(labels)
  local keys = {}
  for k in pairs(labels) do keys[#keys + 1] = k end
  if #keys == 0 then return '' end
  table.sort(keys)
  local pairs_list = {}
  for i, k in ipairs(keys) do pairs_list[i] = {k, labels[k]} end
  return cjson.encode(pairs_list)
end

local function count_usage(ctx, period_start, at_ms, operation, labels, units, quantity, count)
  local bucket = math.floor(at_ms / HOUR_MS) * HOUR_MS
  ctx.usage[#ctx.usage + 1] = {key = usage_key(ctx, period_start),
    suffix = int_text(bucket) .. '|' .. operation .. '|' .. labels_signature(labels),
    units = units, quantity = quantity, count = count}
end

-- Budgets: spend limits per period on one operation or one label value.
local function budget_applies(budget, operation, labels)
  if budget.operation ~= '' then return budget.operation == operation end
  return labels[budget.label_key] == budget.label_value
end

local function check_budgets(ctx, operation, labels, units)
  for id, budget in pairs(ctx.acct.budgets) do
    if budget_applies(budget, operation, labels) and budget.used + units > budget.limit then
      local left = math.max(0, budget.limit - budget.used)
      raise('RESOURCE_EXHAUSTED', 'budget', string.format(
        'budget %s allows %d units per period: %d used or held, %d required',
        id, budget.limit, budget.used, units),
        {available = left, required = units, account_id = ctx.acct.id,
         operation = operation, budget_id = id})
    end
  end
end

local function apply_budgets(ctx, operation, labels, units)
  local applied = {}
  for id, budget in pairs(ctx.acct.budgets) do
    if budget_applies(budget, operation, labels) then
      budget.used = budget.used + units
      applied[#applied + 1] = id
    end
  end
  return applied
end

-- A budget's `used` is what was charged in its scope this period, net of
-- refunds, plus what open holds made while it existed set aside. Charges and
-- refunds count against every budget in scope; holds against the budgets they
-- were checked against (hold.budgets).
local function charge_budgets(ctx, operation, labels, units)
  for _, budget in pairs(ctx.acct.budgets) do
    if budget_applies(budget, operation, labels) then
      budget.used = math.max(0, budget.used + units)
    end
  end
end

-- Gives a hold's units back to the budgets it counted against, if still the same period.
local function release_budgets(ctx, hold, units)
  if hold.budget_period ~= ctx.acct.period_start or units <= 0 then return end
  for _, id in ipairs(hold.budgets or {}) do
    local budget = ctx.acct.budgets[id]
    if budget then budget.used = math.max(0, budget.used - units) end
  end
end

local function next_seq(acct)
  acct.seq = acct.seq + 1
  return acct.seq
end

local function grant_before(a, b)
  local ea = a.expires_at == 0 and MAX_TIME_MS + 1 or a.expires_at
  local eb = b.expires_at == 0 and MAX_TIME_MS + 1 or b.expires_at
  if ea ~= eb then return ea < eb end
  if KIND_RANK[a.kind] ~= KIND_RANK[b.kind] then return KIND_RANK[a.kind] < KIND_RANK[b.kind] end
  return a.seq < b.seq
end

local function grants_remaining(acct)
  local sum = 0
  for _, g in ipairs(acct.grants) do sum = sum + g.remaining end
  return sum
end

-- Available counts overage (used and held) as negative, per the design notes.
local function available(acct)
  return grants_remaining(acct) - acct.overage_used - acct.overage_held
end

local function find_grant(acct, grant_id)
  for _, g in ipairs(acct.grants) do
    if g.id == grant_id then return g end
  end
  return nil
end

-- Events are numbered 1, 2, 3... per account (event_seq), so a gap in the
-- ledger is visible; ids of grants and holds come from another counter (seq).
local function emit(ctx, etype, fields)
  local acct = ctx.acct
  acct.event_seq = (acct.event_seq or 0) + 1
  local event = {'type', etype, 'event_id', acct.id .. '/' .. int_text(acct.event_seq),
    'account_id', acct.id,
    'at', ctx.now}
  for k, v in pairs(fields) do
    event[#event + 1] = k
    if type(v) == 'table' then event[#event + 1] = cjson.encode(v) else event[#event + 1] = v end
  end
  event[#event + 1] = 'available_after'
  event[#event + 1] = available(acct)
  ctx.events[#ctx.events + 1] = event
end

local function moves_text(moves)
  local parts = {}
  for _, mv in ipairs(moves) do parts[#parts + 1] = mv.g .. ':' .. int_text(mv.n) end
  return table.concat(parts, ',')
end

local function add_grant(ctx, kind, units, expires_at, reference)
  local acct = ctx.acct
  local grant = {id = 'g' .. int_text(next_seq(acct)), kind = kind, granted = units, remaining = units,
    expires_at = expires_at, granted_at = ctx.now, reference = reference or '', seq = acct.seq}
  acct.grants[#acct.grants + 1] = grant
  table.sort(acct.grants, grant_before)
  return grant
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

-- Gives units back to the grants they came from, newest-taken first.
-- Returns the moves made and the units counted as expired on the way.
local function give_back(ctx, moves, units)
  local back, lost = {}, 0
  for i = #moves, 1, -1 do
    if units <= 0 then break end
    local mv = moves[i]
    local n = math.min(mv.n, units)
    if n > 0 then
      lost = lost + return_units(ctx, mv, n)
      back[#back + 1] = {g = mv.g, n = n}
      units = units - n
    end
  end
  return back, lost
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

local function hold_key(ctx, rid)
  return ctx.prefix .. 'res:' .. rid
end

-- One copy of each hold per script run, so every change lands on it.
local function load_hold(ctx, rid)
  local hold = ctx.holds[rid]
  if hold == nil then
    hold = load_blob(hold_key(ctx, rid)) or false
    ctx.holds[rid] = hold
  end
  return hold or nil
end

local function mark_hold(ctx, hold)
  ctx.holds[hold.id] = hold
  ctx.dirty[hold.id] = true
end

-- Returns a HELD hold's units to the account (release or expiry).
local function release_hold(ctx, hold, state, event_type)
  local acct = ctx.acct
  local back, lost = give_back(ctx, hold.moves, hold.units - hold.overage)
  acct.overage_held = acct.overage_held - hold.overage
  acct.held = acct.held - hold.units
  release_budgets(ctx, hold, hold.units)
  hold.state = state
  hold.closed_at = ctx.now
  mark_hold(ctx, hold)
  emit(ctx, event_type, {reservation_id = hold.id, operation = hold.operation,
    quantity = hold.quantity, units = hold.units, moves = moves_text(back), expired = lost,
    overage = hold.overage, labels = hold.labels})
end

local function expire_due_holds(ctx)
  local due = redis.call('ZRANGEBYSCORE', ctx.holds_key, '-inf', ctx.now, 'LIMIT', 0, MAX_LAZY_EXPIRIES)
  for _, rid in ipairs(due) do
    local hold = load_hold(ctx, rid)
    if hold and hold.state == 'HELD' and hold.expires_at <= ctx.now then
      release_hold(ctx, hold, 'EXPIRED', 'expire')
    elseif hold and hold.state == 'HELD' then
      -- extended since it was indexed; commit_ctx re-indexes it
      mark_hold(ctx, hold)
    end
  end
end

local function expire_grants(ctx)
  local acct = ctx.acct
  local live = {}
  for _, g in ipairs(acct.grants) do
    if g.expires_at ~= 0 and g.expires_at <= ctx.now then
      acct.total_expired = acct.total_expired + g.remaining
      acct.period_expired = acct.period_expired + g.remaining
      local units = g.remaining
      g.remaining = 0
      emit(ctx, g.kind == 'ALLOTMENT' and 'allotment_expire' or 'grant_expire',
        {grant_id = g.id, units = units, grant_kind = g.kind})
    else
      live[#live + 1] = g
    end
  end
  acct.grants = live
end

local function roll_period(ctx)
  local acct = ctx.acct
  if ctx.now < acct.period_end then return end
  if acct.overage_used > 0 then
    -- Overage of the closed period is invoiced: it becomes granted (paid) units.
    acct.total_granted = acct.total_granted + acct.overage_used
    local units = acct.overage_used
    acct.overage_used = 0
    emit(ctx, 'overage', {units = units, period_start = acct.period_start, period_end = acct.period_end})
  end
  -- Exhausted grants leave the account at the period's end (a refund brings
  -- a still-valid one back); the number of live grants stays bounded.
  local live = {}
  for _, g in ipairs(acct.grants) do
    if g.remaining > 0 then live[#live + 1] = g end
  end
  acct.grants = live
  acct.period_start, acct.period_end = period_bounds(ctx.now, acct.anchor_day)
  acct.period_consumed = 0
  acct.auto_purchased = 0
  acct.period_purchased = 0
  acct.period_expired = 0
  acct.fired = {}
  for _, budget in pairs(acct.budgets) do budget.used = 0 end
  if acct.allotment > 0 then
    local g = add_grant(ctx, 'ALLOTMENT', acct.allotment, acct.period_end, '')
    acct.total_granted = acct.total_granted + acct.allotment
    emit(ctx, 'allotment', {grant_id = g.id, units = acct.allotment,
      period_start = acct.period_start, period_end = acct.period_end})
  end
end

-- Brings the account up to ctx.now: due holds expire, grants expire, a new
-- period's allotment appears. In memory only, like every other change.
local function touch(ctx)
  expire_due_holds(ctx)
  expire_grants(ctx)
  roll_period(ctx)
end

-- AUTO_PURCHASE: packs bought so that, after spending `units`, available
-- stays at or above the threshold, within the per-period cap.
local function auto_purchase(ctx, units)
  local acct = ctx.acct
  if acct.policy ~= 'AUTO_PURCHASE' or acct.ap_units <= 0 then return end
  local after = available(acct) - units
  if after >= acct.ap_threshold then return end
  local packs = math.ceil((acct.ap_threshold - after) / acct.ap_units)
  local cap_packs = math.floor((acct.overage_limit - acct.auto_purchased) / acct.ap_units)
  packs = math.min(packs, cap_packs, MAX_AUTO_PACKS)
  if packs <= 0 then return end
  local bought = packs * acct.ap_units
  local g = add_grant(ctx, 'PURCHASE', bought, 0, 'auto-purchase')
  acct.total_granted = acct.total_granted + bought
  acct.auto_purchased = acct.auto_purchased + bought
  acct.period_purchased = acct.period_purchased + bought
  emit(ctx, 'purchase', {grant_id = g.id, units = bought, auto = 1, packs = packs})
end

-- What the account may still spend, overage headroom included.
local function spendable(acct)
  if acct.policy == 'ALLOW' then
    return grants_remaining(acct) + math.max(0, acct.overage_limit - acct.overage_used - acct.overage_held)
  end
  return math.max(0, available(acct))
end

local function insufficient(ctx, operation, units, spendable_units)
  local acct = ctx.acct
  raise('RESOURCE_EXHAUSTED', 'quantity',
    string.format('account %s has %d units available, %d required', acct.id, spendable_units, units),
    {available = spendable_units, required = units, account_id = acct.id, operation = operation})
end

-- Sets units aside from grants, then overage (ALLOW), buying packs first
-- (AUTO_PURCHASE). Raises RESOURCE_EXHAUSTED before changing anything if
-- the units cannot be covered.
local function allocate(ctx, operation, units)
  local spendable_before = spendable(ctx.acct)
  auto_purchase(ctx, units)
  if units > spendable(ctx.acct) then insufficient(ctx, operation, units, spendable_before) end
  return take(ctx.acct, units)
end

local function price_of(ctx, prices_key, history_key, operation, version)
  local raw = redis.call('HGET', prices_key, operation)
  if not raw then raise('NOT_FOUND', 'operation', 'operation ' .. operation .. ' is not in the price catalog') end
  local current = cmsgpack.unpack(raw)
  if version == 0 or version == current.version then return current.price, current.version end
  local old = redis.call('HGET', history_key, operation .. '@' .. int_text(version))
  if not old then
    raise('FAILED_PRECONDITION', 'price_version',
      string.format('price version %d of %s is unknown', version, operation))
  end
  return tonumber(old), version
end

local function units_for(price, quantity)
  local units = price * quantity
  if units > MAX_UNITS then raise('INVALID_ARGUMENT', 'quantity', 'quantity times price exceeds 2^53 - 1 units') end
  return units
end

local function grant_view(g)
  return {grant_id = g.id, kind = g.kind, granted = g.granted, remaining = g.remaining,
    expires_at = g.expires_at, granted_at = g.granted_at, reference = g.reference}
end

local function balance_view(ctx)
  local acct = ctx.acct
  local grants = {}
  for _, g in ipairs(acct.grants) do grants[#grants + 1] = grant_view(g) end
  return {account_id = acct.id, available = available(acct), held = acct.held, grants = grants,
    overage_used = acct.overage_used, overage_held = acct.overage_held,
    overage_limit = acct.overage_limit, period_start = acct.period_start,
    period_end = acct.period_end, period_consumed = acct.period_consumed,
    auto_purchased = acct.auto_purchased, total_granted = acct.total_granted,
    period_purchased = acct.period_purchased, period_expired = acct.period_expired,
    total_charged = acct.total_charged, total_refunded = acct.total_refunded,
    total_expired = acct.total_expired, as_of = ctx.now}
end

local function account_view(acct)
  return {account_id = acct.id, allotment = acct.allotment, policy = acct.policy,
    overage_limit = acct.overage_limit, labels = acct.labels, ap_units = acct.ap_units,
    ap_threshold = acct.ap_threshold, anchor_day = acct.anchor_day, created_at = acct.created_at,
    period_start = acct.period_start, period_end = acct.period_end, alerts = acct.alerts,
    budgets = acct.budgets}
end

-- Asserts the account's books balance; a failure is a bug, so it crashes
-- the script before it writes anything.
local function assert_books(acct)
  local lhs = acct.total_granted
  local rhs = available(acct) + acct.held + acct.total_charged - acct.total_refunded + acct.total_expired
  if lhs ~= rhs then
    error(string.format('books out of balance for %s: granted %d ~= %d', acct.id, lhs, rhs), 0)
  end
  for _, g in ipairs(acct.grants) do
    if g.remaining < 0 then error('negative grant ' .. g.id .. ' on ' .. acct.id, 0) end
  end
end

-- Idempotency records: {fp = request fingerprint, answer = reply, exp = clock
-- value it lapses at}. The clock decides (so tests can move it); Redis' own
-- PX removes the record from memory later.
local function idem_lookup(key, fingerprint, now)
  local rec = load_blob(key)
  if not rec or (rec.exp and rec.exp <= now) then return nil end
  if rec.fp ~= fingerprint then
    raise('FAILED_PRECONDITION', 'idempotency_key',
      'idempotency_key was already used with a different request')
  end
  rec.answer.replayed = true
  return rec.answer
end

-- Threshold alerts, each raised once per period: percent of the allotment
-- used (holds included), available below a floor, overage started.
local function current_allotment(acct)
  for _, g in ipairs(acct.grants) do
    if g.kind == 'ALLOTMENT' and g.expires_at == acct.period_end then return g end
  end
  return nil
end

local function fire(ctx, name, units)
  if ctx.acct.fired[name] then return end
  ctx.acct.fired[name] = true
  emit(ctx, 'alert', {alert = name, units = units})
end

check_alerts = function(ctx)
  local acct = ctx.acct
  local alerts = acct.alerts
  local allotment = current_allotment(acct)
  if allotment and allotment.granted > 0 then
    local used = allotment.granted - allotment.remaining
    for _, percent in ipairs(alerts.percent) do
      if used * 100 >= percent * allotment.granted then
        fire(ctx, 'allotment_used_' .. int_text(percent), used)
      end
    end
  end
  if alerts.below > 0 and available(acct) < alerts.below then
    fire(ctx, 'balance_below_' .. int_text(alerts.below), available(acct))
  end
  if alerts.overage and acct.overage_used + acct.overage_held > 0 then
    fire(ctx, 'overage_started', acct.overage_used + acct.overage_held)
  end
end

local function check_alert_settings(alerts)
  if type(alerts) ~= 'table' then raise('INVALID_ARGUMENT', 'alerts', 'alerts must be a map') end
  local percent = alerts.percent or {}
  if type(percent) ~= 'table' or #percent > 16 then
    raise('INVALID_ARGUMENT', 'alerts.allotment_used_percent', 'at most 16 percentages')
  end
  for _, p in ipairs(percent) do check_int(p, 'alerts.allotment_used_percent', 1, 1000) end
  return {percent = percent,
    below = check_int(alerts.below or 0, 'alerts.balance_below', 0, MAX_UNITS),
    overage = alerts.overage == true}
end

-- An idempotency record to write with the script's other changes.
local function remember(ctx, key, fingerprint, answer, window_ms)
  ctx.idem = {key = key, window_ms = window_ms,
    record = {fp = fingerprint, answer = answer, exp = ctx.now + window_ms}}
end

-- The single write phase of a script. The last event carries images of the
-- account, the holds and the idempotency record as written (`_acct`,
-- `_holds`, `_idem`), so the ledger can restore Redis from events alone.
-- Returns the stream ids of the events.
local function commit_ctx(ctx)
  local acct = ctx.acct
  check_alerts(ctx)
  assert_books(acct)
  if #ctx.events == 0 then
    -- Nothing moved (e.g. refunding what is already refunded): every change of
    -- the account or a hold emits an event, so only the answer is kept.
    if next(ctx.dirty) ~= nil or #ctx.usage > 0 then error('a change without an event', 0) end
    if ctx.idem then save_blob(ctx.idem.key, ctx.idem.record, ctx.idem.window_ms) end
    return {}
  end
  save_blob(ctx.acct_key, acct)
  local hold_images = {}
  for rid in pairs(ctx.dirty) do
    local hold = ctx.holds[rid]
    hold_images[rid] = hold
    if hold.state == 'HELD' then
      save_blob(hold_key(ctx, rid), hold)
      redis.call('ZADD', ctx.holds_key, hold.expires_at, rid)
      redis.call('ZADD', ctx.expiries_key, hold.expires_at, rid)
    else
      save_blob(hold_key(ctx, rid), hold, ctx.retention_ms)
      redis.call('ZREM', ctx.holds_key, rid)
      redis.call('ZREM', ctx.expiries_key, rid)
    end
  end
  local last = ctx.events[#ctx.events]
  last[#last + 1] = '_acct'
  last[#last + 1] = cmsgpack.pack(acct)
  if next(hold_images) ~= nil then
    last[#last + 1] = '_holds'
    last[#last + 1] = cmsgpack.pack(hold_images)
  end
  if ctx.idem then
    save_blob(ctx.idem.key, ctx.idem.record, ctx.idem.window_ms)
    last[#last + 1] = '_idem'
    last[#last + 1] = cmsgpack.pack({key = ctx.idem.key, record = ctx.idem.record})
  end
  for _, u in ipairs(ctx.usage) do
    redis.call('HINCRBY', u.key, 'u|' .. u.suffix, u.units)
    if u.quantity ~= 0 then redis.call('HINCRBY', u.key, 'q|' .. u.suffix, u.quantity) end
    if u.count ~= 0 then redis.call('HINCRBY', u.key, 'c|' .. u.suffix, u.count) end
    -- past periods are reported from the ledger; the counters outlive theirs a while
    redis.call('PEXPIREAT', u.key, acct.period_end + USAGE_RETENTION_MS)
  end
  local ids = {}
  for i, event in ipairs(ctx.events) do
    ids[i] = redis.call('XADD', ctx.events_key, '*', unpack(event))
  end
  return ids
end

-- Gives back up to `units` of a charge, newest-taken first; each move keeps
-- what was refunded from it in mv.r.
local function refund_moves(ctx, moves, units)
  local back, lost = {}, 0
  for i = #moves, 1, -1 do
    if units <= 0 then break end
    local mv = moves[i]
    local n = math.min(mv.n - (mv.r or 0), units)
    if n > 0 then
      mv.r = (mv.r or 0) + n
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

-- Expires a hold whose time has come even when the lazy sweep skipped it.
local function settle_if_due(ctx, hold)
  if hold.state == 'HELD' and hold.expires_at <= ctx.now then
    release_hold(ctx, hold, 'EXPIRED', 'expire')
  end
end

local function reservation_id_for(shard, seq, account_id)
  return shard .. '.' .. int_text(seq) .. '.' .. account_id
end

local POLICIES = {DENY = true, ALLOW = true, AUTO_PURCHASE = true}

local function check_policy(policy, ap_units)
  if not POLICIES[policy] then
    raise('INVALID_ARGUMENT', 'overage_policy', 'overage_policy must be DENY, ALLOW or AUTO_PURCHASE')
  end
  if policy == 'AUTO_PURCHASE' and ap_units <= 0 then
    raise('INVALID_ARGUMENT', 'auto_purchase_units', 'auto_purchase_units must be positive for AUTO_PURCHASE')
  end
end

-- The checks shared by reserve and charge; returns the decoded fields.
local function check_spend_request(req)
  return {
    account_id = check_str(req.account_id, 'account_id', 128),
    operation = check_str(req.operation, 'operation', 128),
    quantity = check_int(req.quantity, 'quantity', 1, MAX_UNITS),
    idem_key = check_str(req.idempotency_key, 'idempotency_key', 128),
    price_version = check_int(req.price_version, 'price_version', 0, MAX_UNITS),
    labels = check_labels(req.labels, 'labels'),
    window_ms = check_int(req.idem_window_ms, 'idem_window_ms', 1, MAX_TIME_MS),
    fingerprint = check_str(req.fingerprint, 'fingerprint', 64),
  }
end

-- A new reservation record, HELD or already COMMITTED by the caller.
local function new_hold(ctx, spend, unit_price, price_version, units)
  local acct = ctx.acct
  return {id = reservation_id_for(ctx.shard, next_seq(acct), acct.id), account_id = acct.id,
    operation = spend.operation, quantity = spend.quantity, unit_price = unit_price,
    price_version = price_version, units = units, overage = 0, moves = {}, labels = spend.labels,
    state = 'HELD', created_at = ctx.now, expires_at = 0, idempotency_key = spend.idem_key,
    charged = 0, charged_quantity = 0, overage_charged = 0, overage_refunded = 0, refunded = 0,
    charge_moves = {}, charge_period = 0, late = false, charged_at = 0,
    budgets = {}, budget_period = acct.period_start}
end
