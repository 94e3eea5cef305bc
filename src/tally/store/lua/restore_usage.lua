--! include: codec usage
-- restore_usage: writes usage records recovery computed from the ledger into
-- one account's billing-period counters, through the formatter the scripts
-- write with. A period's records come in calls of at most
-- USAGE_RECORDS_PER_CALL_MAX; the first one replaces what the counters held.
-- KEYS: 1-2 the account's usage counter slots (lib/usage.lua)
-- ARGV[1] (msgpack): now, period_start (ms), replace (bool: delete the counters first),
--   period_end (the counters leave USAGE_RETENTION_MS after it),
--   records = [{bucket_ms, operation, labels, units, quantity, count}]
-- Returns: {records = how many records were written}.

return run(function()
  local req = decode_request()
  if type(req.replace) ~= 'boolean' then
    raise('INVALID_ARGUMENT', 'replace', 'replace must be a boolean')
  end
  local period_start = check_int(req.period_start, 'period_start', 0, TIMESTAMP_MS_MAX)
  local period_end = check_int(req.period_end, 'period_end', 0, TIMESTAMP_MS_MAX)
  local records = req.records
  if type(records) ~= 'table' then
    raise('INVALID_ARGUMENT', 'records', 'records must be a list')
  end
  if #records > USAGE_RECORDS_PER_CALL_MAX then
    raise('INVALID_ARGUMENT', 'records',
      string.format('records holds at most %d records a call', USAGE_RECORDS_PER_CALL_MAX))
  end
  for i, record in ipairs(records) do check_usage_record(record, 'records[' .. i .. ']') end
  if #records == 0 then
    -- nothing to restore: a replacing call leaves the period no counters
    local stale = req.replace and counters_of(KEYS, period_start)
    if stale then redis.call('DEL', stale) end
    return {records = 0}
  end
  local key = claim_counters(KEYS, period_start, req.replace)
  for _, record in ipairs(records) do add_counters(key, record) end
  keep_counters(key, period_end)
  return {records = #records}
end)
