--! flags: no-writes
--! include: codec calendar
-- billing_period: the [start, end) of the billing period that starts in a
-- given month on a given anchor day (GetUsageReport's `period`). Reads no key.
-- KEYS: none
-- ARGV[1] (msgpack): now, year, month, anchor_day
-- Returns: {period_start, period_end} (ms).

return run(function()
  local req = decode_request()
  local year = check_int(req.year, 'period', PERIOD_YEAR_MIN, PERIOD_YEAR_MAX)
  local month = check_int(req.month, 'period', 1, 12)
  local anchor_day = check_int(req.anchor_day, 'anchor_day', 1, BILLING_ANCHOR_DAY_MAX)
  local period_start, period_end = period_starting_in(year, month, anchor_day)
  return {period_start = period_start, period_end = period_end}
end)
