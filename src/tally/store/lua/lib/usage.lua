--! include: codec keys
-- usage: the usage counters of a billing period (one hash per account and
-- period). Per hour bucket, operation and label set they hold the net units
-- (field `u|<bucket>|<operation>|<labels>`), the quantity (`q|...`) and the
-- count of charges (`c|...`). Refunds net out the charge they refund, in its
-- bucket. Changes are collected on ctx and written by commit_ctx.

local HOUR_MS = 3600000

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
  ctx.usage[#ctx.usage + 1] = {key = usage_key(ctx.prefix, ctx.acct.id, period_start),
    suffix = int_text(bucket) .. '|' .. operation .. '|' .. labels_signature(labels),
    units = units, quantity = quantity, count = count}
end

-- Part of the write phase: applies the changes count_usage collected.
local function write_usage(ctx)
  for _, u in ipairs(ctx.usage) do
    redis.call('HINCRBY', u.key, 'u|' .. u.suffix, u.units)
    if u.quantity ~= 0 then redis.call('HINCRBY', u.key, 'q|' .. u.suffix, u.quantity) end
    if u.count ~= 0 then redis.call('HINCRBY', u.key, 'c|' .. u.suffix, u.count) end
    -- past periods are reported from the ledger; the counters outlive theirs a while
    redis.call('PEXPIREAT', u.key, ctx.acct.period_end + USAGE_RETENTION_MS)
  end
end

-- The net units of a billing period as the counters hold them (changes
-- collected by this run not included): a list of {operation, labels, units}.
local function period_units(ctx, period_start)
  local fields = redis.call('HGETALL', usage_key(ctx.prefix, ctx.acct.id, period_start))
  local rows = {}
  for i = 1, #fields, 2 do
    local kind, _, operation, signature = string.match(fields[i], '^(%a)|(%d+)|([^|]*)|(.*)$')
    if kind == 'u' then
      local labels = {}
      if signature ~= '' then
        for _, pair in ipairs(cjson.decode(signature)) do labels[pair[1]] = pair[2] end
      end
      rows[#rows + 1] = {operation = operation, labels = labels, units = tonumber(fields[i + 1])}
    end
  end
  return rows
end
