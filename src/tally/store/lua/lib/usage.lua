--! include: codec keys
-- usage: the usage counters of a billing period (one hash per account and
-- period), and the one place their field format is written and read.
-- Per hour bucket, operation and label set a hash holds the net units
-- (field `u|<bucket ms>|<operation>|<labels>`), the quantity (`q|...`) and the
-- count of charges (`c|...`); <labels> is the label pairs sorted by key, as a
-- JSON array (empty text without labels). Refunds net out the charge they
-- refund, in its bucket.
-- Everything else sees usage records {bucket_ms, operation, labels, units,
-- quantity, count}: scripts collect them on ctx (count_usage, written by
-- commit_ctx), recovery writes them (restore_usage.lua), reports and budgets
-- read them (usage_records; read_usage.lua).

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

-- Adds one record to a counter hash (a zero quantity or count writes no field).
local function add_counters(key, record)
  local suffix = int_text(record.bucket_ms) .. '|' .. record.operation .. '|'
    .. labels_signature(record.labels)
  redis.call('HINCRBY', key, 'u|' .. suffix, record.units)
  if record.quantity ~= 0 then redis.call('HINCRBY', key, 'q|' .. suffix, record.quantity) end
  if record.count ~= 0 then redis.call('HINCRBY', key, 'c|' .. suffix, record.count) end
end

-- Past periods are reported from the ledger; the counters outlive theirs a while.
local function keep_counters(key, period_end)
  redis.call('PEXPIREAT', key, period_end + USAGE_RETENTION_MS)
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

-- The counters of ctx's account for the billing period starting at period_start.
local function counters_key(ctx, period_start)
  return usage_key(ctx.prefix, ctx.acct.id, period_start)
end

local function count_usage(ctx, period_start, at_ms, operation, labels, units, quantity, count)
  ctx.usage[#ctx.usage + 1] = {key = counters_key(ctx, period_start),
    record = {bucket_ms = math.floor(at_ms / HOUR_MS) * HOUR_MS, operation = operation,
      labels = labels, units = units, quantity = quantity, count = count}}
end

-- Part of the write phase: applies the changes count_usage collected.
local function write_usage(ctx)
  for _, u in ipairs(ctx.usage) do
    add_counters(u.key, u.record)
    keep_counters(u.key, ctx.acct.period_end)
  end
end

-- The records a counter hash holds (changes collected by this run not
-- included), one per bucket, operation and label set, in no particular order.
local function usage_records(key)
  local fields = redis.call('HGETALL', key)
  local records, by_suffix = {}, {}
  for i = 1, #fields, 2 do
    local kind, suffix = string.match(fields[i], '^([uqc])|(.*)$')
    if kind == nil then error('usage counter field ' .. fields[i] .. ' is malformed', 0) end
    local record = by_suffix[suffix]
    if record == nil then
      local bucket, operation, signature = string.match(suffix, '^(%d+)|([^|]*)|(.*)$')
      record = {bucket_ms = tonumber(bucket), operation = operation, labels = labels_of(signature),
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
  end
  return records
end
