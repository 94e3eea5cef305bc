--! include: codec
-- usage: the usage counters of a billing period, and the one place their
-- field format is written and read.
-- An account has two counter slots (two hashes, declared keys: ctx.usage_keys),
-- each holding one billing period, its start in the field `p`: the current
-- period and the one before it (still read for a short grace after its end).
-- A period with no slot yet takes the slot of the older one (its counters are
-- dropped: that period ended more than a period ago and is reported from the
-- ledger), in the write phase.
-- The hash stays bounded whatever the labels' cardinality: it tracks at most
-- USAGE_LABEL_SETS_MAX label sets a period (each at most
-- USAGE_LABEL_SET_BYTES_MAX bytes as text), the first ones charged; usage with
-- any other label set is counted under the one label set
-- {USAGE_OTHER_LABEL = USAGE_OTHER_LABEL} (a key no caller's label can have).
-- A label set is named by the SHA1 of its text <labels> (the label pairs
-- sorted by key, as a JSON array), its `sid`: '' without labels, '*' for the
-- other label set. Fields:
--   u|<bucket ms>|<operation>|<sid>  net units per hour bucket (also q| the
--                                    quantity, c| the count of charges)
--   l|<sid>   <labels> of a tracked label set
--   t|<sid>   a tracked label set's net units this period (label budgets)
--   o|<operation>  an operation's net units this period (operation budgets)
--   sets      the tracked sids, sorted, as a JSON array
--   p         the start (ms) of the billing period the slot holds
-- Refunds net out the charge they refund, in its bucket; only the current
-- period's counters are kept (earlier ones are reported from the ledger).
-- Everything else sees usage records {bucket_ms, operation, labels, units,
-- quantity, count}: scripts collect them on ctx (count_usage, written by
-- commit_ctx), recovery writes them (restore_usage.lua), reports read them
-- (usage_records; read_usage.lua) and budgets read the period totals
-- (usage_in_scope).

local OTHER_SID = '*'

local function labels_signature(labels)
  local keys = {}
  for k in pairs(labels) do keys[#keys + 1] = k end
  if #keys == 0 then return '' end
  table.sort(keys)
  local pairs_list = {}
  for i, k in ipairs(keys) do pairs_list[i] = {k, labels[k]} end
  return cjson.encode(pairs_list)
end

local function labels_of(signature)
  local labels = {}
  if signature ~= '' then
    for _, pair in ipairs(cjson.decode(signature)) do labels[pair[1]] = pair[2] end
  end
  return labels
end

local function tracked_sids(key)
  local text = redis.call('HGET', key, 'sets')
  if not text then return {} end
  return cjson.decode(text)
end

-- The sid a record with these labels is counted under, and whether its label
-- set is new to the counters (tracked from this record on). Reads only.
local function label_set(key, labels)
  if labels[USAGE_OTHER_LABEL] ~= nil then return OTHER_SID, nil end
  local signature = labels_signature(labels)
  if signature == '' then return '', nil end
  local sid = redis.sha1hex(signature)
  if redis.call('HEXISTS', key, 'l|' .. sid) == 1 then return sid, nil end
  if #signature > USAGE_LABEL_SET_BYTES_MAX or #tracked_sids(key) >= USAGE_LABEL_SETS_MAX then
    return OTHER_SID, nil
  end
  return sid, signature
end

local function counter_suffix(record, sid)
  return int_text(record.bucket_ms) .. '|' .. record.operation .. '|' .. sid
end

-- Adds one record to a counter hash (a zero quantity or count writes no field).
local function add_counters(key, record)
  local sid, new_signature = label_set(key, record.labels)
  if new_signature then
    local sids = tracked_sids(key)
    sids[#sids + 1] = sid
    table.sort(sids)
    redis.call('HSET', key, 'l|' .. sid, new_signature, 'sets', cjson.encode(sids))
  end
  local suffix = counter_suffix(record, sid)
  redis.call('HINCRBY', key, 'u|' .. suffix, int_text(record.units))
  if record.quantity ~= 0 then redis.call('HINCRBY', key, 'q|' .. suffix, int_text(record.quantity)) end
  if record.count ~= 0 then redis.call('HINCRBY', key, 'c|' .. suffix, int_text(record.count)) end
  if sid ~= '' and sid ~= OTHER_SID then redis.call('HINCRBY', key, 't|' .. sid, int_text(record.units)) end
  redis.call('HINCRBY', key, 'o|' .. record.operation, int_text(record.units))
end

-- Past periods are reported from the ledger; the counters outlive theirs a
-- short grace (USAGE_RETENTION_MS), and never leave sooner than that grace
-- from Redis's own clock (the expiry is Redis's: counters written for a
-- period the caller's clock says has just ended must still be readable).
local function keep_counters(key, period_end)
  local time = redis.call('TIME')
  local redis_now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('PEXPIREAT', key, int_text(math.max(period_end, redis_now_ms) + USAGE_RETENTION_MS))
end

-- Refuses a record the field format could not hold (before anything is written).
local function check_usage_record(record, field)
  if type(record) ~= 'table' then raise('INVALID_ARGUMENT', field, field .. ' must be a map') end
  local bucket_ms = check_int(record.bucket_ms, field .. '.bucket_ms', 0, TIMESTAMP_MS_MAX)
  if bucket_ms % HOUR_MS ~= 0 then
    raise('INVALID_ARGUMENT', field .. '.bucket_ms', field .. '.bucket_ms must be a whole hour')
  end
  local operation = check_str(record.operation, field .. '.operation', OPERATION_BYTES_MAX)
  if string.find(operation, '|', 1, true) then
    raise('INVALID_ARGUMENT', field .. '.operation', field .. '.operation must not contain |')
  end
  local labels = check_labels(record.labels, field .. '.labels')
  local count = 0
  for _ in pairs(labels) do count = count + 1 end
  if count > LABELS_MAX then
    raise('INVALID_ARGUMENT', field .. '.labels',
      string.format('%s.labels holds at most %d labels', field, LABELS_MAX))
  end
  check_int(record.units, field .. '.units', -UNITS_MAX, UNITS_MAX)
  check_int(record.quantity, field .. '.quantity', 0, UNITS_MAX)
  check_int(record.count, field .. '.count', 0, UNITS_MAX)
end

-- The start of the period a counter slot holds (-1: none).
local function slot_period(key)
  return tonumber(redis.call('HGET', key, 'p') or -1)
end

-- The slot of `slots` (an account's two counter keys) holding the billing
-- period starting at period_start, or nil.
local function counters_of(slots, period_start)
  for _, key in ipairs(slots) do
    if slot_period(key) == period_start then return key end
  end
  return nil
end

-- The slot to write the period's counters to: the one holding it, else the
-- older slot emptied for it; with `replace` the slot starts empty either way.
-- Writes: only in a write phase.
local function claim_counters(slots, period_start, replace)
  local key = counters_of(slots, period_start)
  if key and not replace then return key end
  if not key then
    key = slot_period(slots[1]) <= slot_period(slots[2]) and slots[1] or slots[2]
  end
  redis.call('DEL', key)
  redis.call('HSET', key, 'p', int_text(period_start))
  return key
end

-- Refuses a change that would take an hour's quantity or count past
-- UNITS_MAX (before anything is written; net units are bounded by the
-- account's running totals).
local function check_counters(key, record)
  local suffix = counter_suffix(record, (label_set(key, record.labels)))
  local held = redis.call('HMGET', key, 'q|' .. suffix, 'c|' .. suffix)
  if tonumber(held[1] or 0) + record.quantity > UNITS_MAX
      or tonumber(held[2] or 0) + record.count > UNITS_MAX then
    raise('FAILED_PRECONDITION', 'quantity', string.format(
      'the usage counted for %s in this hour would pass %d', record.operation, UNITS_MAX))
  end
end

-- Collects a change of the current period's counters; a refund of a charge of
-- an earlier period changes none (that period is reported from the ledger).
-- A period without counters yet has nothing to check the change against.
local function count_usage(ctx, period_start, at_ms, operation, labels, units, quantity, count)
  if period_start ~= ctx.acct.period_start then return end
  local record = {bucket_ms = math.floor(at_ms / HOUR_MS) * HOUR_MS, operation = operation,
    labels = labels, units = units, quantity = quantity, count = count}
  local key = counters_of(ctx.usage_keys, period_start)
  if key then check_counters(key, record) end
  ctx.usage[#ctx.usage + 1] = record
end

-- Part of the write phase: applies the changes count_usage collected (all of
-- the current period).
local function write_usage(ctx)
  if #ctx.usage == 0 then return end
  local key = claim_counters(ctx.usage_keys, ctx.acct.period_start, false)
  for _, record in ipairs(ctx.usage) do add_counters(key, record) end
  keep_counters(key, ctx.acct.period_end)
end

-- The records a counter hash holds (changes collected by this run not
-- included), one per bucket, operation and label set, in no particular order.
local function usage_records(key)
  local fields = redis.call('HGETALL', key)
  local records, by_suffix, labels_by_sid = {}, {}, {['']= {}, [OTHER_SID] = {[USAGE_OTHER_LABEL] = USAGE_OTHER_LABEL}}
  for i = 1, #fields, 2 do
    local sid = string.match(fields[i], '^l|(.*)$')
    if sid then labels_by_sid[sid] = labels_of(fields[i + 1]) end
  end
  for i = 1, #fields, 2 do
    local kind, suffix = string.match(fields[i], '^([uqc])|(.*)$')
    if kind ~= nil then
      local record = by_suffix[suffix]
      if record == nil then
        local bucket, operation, sid = string.match(suffix, '^(%d+)|([^|]*)|(.*)$')
        local labels = labels_by_sid[sid]
        if labels == nil then error('usage counter field ' .. fields[i] .. ' names no label set', 0) end
        record = {bucket_ms = tonumber(bucket), operation = operation, labels = labels,
          units = 0, quantity = 0, count = 0}
        by_suffix[suffix] = record
        records[#records + 1] = record
      end
      local value = tonumber(fields[i + 1])
      if kind == 'u' then
        record.units = value
      elseif kind == 'q' then
        record.quantity = value
      else
        record.count = value
      end
    elseif not string.match(fields[i], '^[lto]|') and fields[i] ~= 'sets' and fields[i] ~= 'p' then
      error('usage counter field ' .. fields[i] .. ' is malformed', 0)
    end
  end
  return records
end

-- The net units the current period's counters hold in a budget's scope: an
-- operation's, or those of the tracked label sets carrying the budget's label
-- value (usage counted under the other label set is not known by value).
-- Reads at most USAGE_LABEL_SETS_MAX label sets. key: the period's slot, or
-- nil when the period has no counters.
local function usage_in_scope(key, budget)
  if not key then return 0 end
  if budget.operation ~= '' then
    return tonumber(redis.call('HGET', key, 'o|' .. budget.operation) or 0)
  end
  local sum = 0
  for _, sid in ipairs(tracked_sids(key)) do
    local held = redis.call('HMGET', key, 'l|' .. sid, 't|' .. sid)
    if labels_of(held[1])[budget.label_key] == budget.label_value then sum = sum + tonumber(held[2] or 0) end
  end
  return sum
end
