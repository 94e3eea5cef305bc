--! flags: no-writes
--! include: codec usage
-- read_usage: the usage records one account's billing-period counters hold
-- (GetUsageReport's current period). Moves nothing.
-- KEYS: 1-2 the account's usage counter slots (lib/usage.lua)
-- ARGV[1] (msgpack): now, period_start (ms)
-- Returns: {records = [{bucket_ms, operation, labels, units, quantity, count}]}
--   (in no particular order; none when the period has no counters).

return run(function()
  local req = decode_request()
  local period_start = check_int(req.period_start, 'period_start', 0, TIMESTAMP_MS_MAX)
  local key = counters_of(KEYS, period_start)
  if not key then return {records = {}} end
  return {records = usage_records(key)}
end)
