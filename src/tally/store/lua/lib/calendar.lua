-- calendar: billing periods from a clock value passed in (never wall time).
-- Periods are calendar months in UTC anchored at a day of the month; an
-- anchor past a month's end is clamped to its last day.
-- Day arithmetic after H. Hinnant's days_from_civil / civil_from_days.

local DAY_MS = 86400000

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function next_month(y, m)
  if m == 12 then return y + 1, 1 end
  return y, m + 1
end

local function anchor_ms(y, m, anchor_day)
  local ny, nm = next_month(y, m)
  local month_days = days_from_civil(ny, nm, 1) - days_from_civil(y, m, 1)
  return days_from_civil(y, m, math.min(anchor_day, month_days)) * DAY_MS
end

-- The [start, end) of the billing period that starts in month m of year y.
local function period_starting_in(y, m, anchor_day)
  local ny, nm = next_month(y, m)
  return anchor_ms(y, m, anchor_day), anchor_ms(ny, nm, anchor_day)
end

-- The [start, end) of the billing period holding now_ms.
local function period_bounds(now_ms, anchor_day)
  local y, m = civil_from_days(math.floor(now_ms / DAY_MS))
  if now_ms < anchor_ms(y, m, anchor_day) then
    if m == 1 then y, m = y - 1, 12 else m = m - 1 end
  end
  return period_starting_in(y, m, anchor_day)
end

local function day_of_month(now_ms)
  local _, _, d = civil_from_days(math.floor(now_ms / DAY_MS))
  return d
end
