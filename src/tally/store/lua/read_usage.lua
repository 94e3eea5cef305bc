--! flags: no-writes
--! include: codec usage
-- read_usage: the usage records one account's billing-period counters hold
-- (GetUsageReport's current period). Moves nothing.
-- KEYS: 1 the period's usage counters hash
-- ARGV[1] (msgpack): now
-- Returns: {records = [{bucket_ms, operation, labels, units, quantity, count}]}
--   (in no particular order; none when the period has no counters).

return run(function()
  decode_request()
  return {records = usage_records(KEYS[1])}
end)
