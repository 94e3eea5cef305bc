-- codec: argument decoding, typed failures and the script runner.
-- Every script receives one msgpack-encoded request table in ARGV[1] and
-- returns one msgpack-encoded reply: {ok=true, r=<result>} or
-- {ok=false, code=<grpc code name>, field=<field>, message=<text>, ...}.
-- Amounts are Lua numbers (doubles): every amount is checked to be an
-- integer no larger than UNITS_MAX = 2^53 - 1 before it is used.
-- UNITS_MAX, TIMESTAMP_MS_MAX and every other limit come from the generated
-- limits prelude (tally/domain/limits.py).

local function raise(code, field, message, extra)
  error({tally_err = true, code = code, field = field, message = message, extra = extra}, 0)
end

local function check_int(value, field, lo, hi)
  if type(value) ~= 'number' or value ~= value or math.floor(value) ~= value then
    raise('INVALID_ARGUMENT', field, field .. ' must be an integer')
  end
  if value < lo or value > hi then
    raise('INVALID_ARGUMENT', field, string.format('%s must be between %d and %d', field, lo, hi))
  end
  return value
end

local function check_str(value, field, max_len, allow_empty)
  if type(value) ~= 'string' then raise('INVALID_ARGUMENT', field, field .. ' must be a string') end
  if #value == 0 and not allow_empty then raise('INVALID_ARGUMENT', field, field .. ' is required') end
  if #value > max_len then
    raise('INVALID_ARGUMENT', field, string.format('%s must be at most %d bytes', field, max_len))
  end
  return value
end

-- The principal a money-in or admin request names (`by`); nil: the server's own action.
local function check_by(value)
  if value == nil then return nil end
  return check_str(value, 'by', PRINCIPAL_ID_BYTES_MAX)
end

local function check_labels(value, field)
  if type(value) ~= 'table' then raise('INVALID_ARGUMENT', field, field .. ' must be a map') end
  for k, v in pairs(value) do
    if type(k) ~= 'string' or type(v) ~= 'string' then
      raise('INVALID_ARGUMENT', field, field .. ' keys and values must be strings')
    end
  end
  return value
end

local function decode_request()
  local ok, req = pcall(cmsgpack.unpack, ARGV[1] or '')
  if not ok or type(req) ~= 'table' then raise('INVALID_ARGUMENT', 'request', 'request is not a msgpack map') end
  check_int(req.now, 'now', 0, TIMESTAMP_MS_MAX)
  return req
end

local function load_blob(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  return cmsgpack.unpack(raw)
end

-- Returns the bytes written, so that an image of the value reuses them.
local function save_blob(key, value, ttl_ms)
  local packed = cmsgpack.pack(value)
  if ttl_ms and ttl_ms > 0 then
    redis.call('SET', key, packed, 'PX', ttl_ms)
  else
    redis.call('SET', key, packed)
  end
  return packed
end

-- A msgpack map from entries already packed, {packed key, packed value, ...}:
-- the bytes cmsgpack.pack would write for the map (up to the order of its
-- entries, which no decoder reads), without packing the values again.
local function packed_map(entries)
  local n = #entries / 2
  local header
  if n < 16 then
    header = string.char(0x80 + n)
  elseif n < 65536 then
    header = string.char(0xde, math.floor(n / 256), n % 256)
  else
    header = string.char(0xdf, math.floor(n / 16777216), math.floor(n / 65536) % 256,
      math.floor(n / 256) % 256, n % 256)
  end
  return header .. table.concat(entries)
end

-- Integer to decimal text without the 14-digit rounding of tostring().
local function int_text(n)
  return string.format('%d', n)
end

-- What a run reports beside its result: `fence`, the shard's fence as the run
-- left it (set by lib/fence.lua; absent from scripts that do not check one).
-- The library outlives a call: run() clears what the last call reported.
local run_report = {}

local function run(main)
  run_report.fence = nil
  local ok, result = pcall(main)
  if ok then return cmsgpack.pack({ok = true, r = result, fence = run_report.fence}) end
  if type(result) == 'table' and result.tally_err then
    return cmsgpack.pack({ok = false, code = result.code, field = result.field or '',
      message = result.message or '', extra = result.extra or {}})
  end
  error(result, 0)
end
