--! include: codec books
-- events: the ledger events a script emits, written by commit_ctx.

-- A field's value as the stream holds it: numbers (all integers, within
-- UNITS_MAX) through int_text, never Lua's or Redis's own number-to-text,
-- which round or turn to exponent form; tables (labels) as JSON.
local function field_text(v)
  if type(v) == 'number' then return int_text(v) end
  if type(v) == 'table' then return cjson.encode(v) end
  return v
end

-- Events are numbered 1, 2, 3... per account (event_seq), so a gap in the
-- ledger is visible; ids of grants come from another counter (seq).
-- etype is a value of ENTRY (a misspelt member is nil: a bug, so a crash before any write).
local function emit(ctx, etype, fields)
  if type(etype) ~= 'string' then error('emit: unknown entry type', 0) end
  local acct = ctx.acct
  acct.event_seq = (acct.event_seq or 0) + 1
  local event = {'type', etype, 'event_id', acct.id .. '/' .. int_text(acct.event_seq),
    'account_id', acct.id,
    'at', int_text(ctx.now)}
  for k, v in pairs(fields) do
    event[#event + 1] = k
    event[#event + 1] = field_text(v)
  end
  event[#event + 1] = 'available_after'
  event[#event + 1] = int_text(available(acct))
  ctx.events[#ctx.events + 1] = event
end

-- Grant moves as an event field: `<grant id>:<units>,...`.
local function moves_text(moves)
  local parts = {}
  for _, mv in ipairs(moves) do parts[#parts + 1] = mv.g .. ':' .. int_text(mv.n) end
  return table.concat(parts, ',')
end
