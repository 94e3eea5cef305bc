--! include: codec books
-- events: the ledger events a script emits, written by commit_ctx.

-- Events are numbered 1, 2, 3... per account (event_seq), so a gap in the
-- ledger is visible; ids of grants and holds come from another counter (seq).
-- etype is a value of ENTRY (a misspelt member is nil: a bug, so a crash before any write).
local function emit(ctx, etype, fields)
  if type(etype) ~= 'string' then error('emit: unknown entry type', 0) end
  local acct = ctx.acct
  acct.event_seq = (acct.event_seq or 0) + 1
  local event = {'type', etype, 'event_id', acct.id .. '/' .. int_text(acct.event_seq),
    'account_id', acct.id,
    'at', ctx.now}
  for k, v in pairs(fields) do
    event[#event + 1] = k
    if type(v) == 'table' then event[#event + 1] = cjson.encode(v) else event[#event + 1] = v end
  end
  event[#event + 1] = 'available_after'
  event[#event + 1] = available(acct)
  ctx.events[#ctx.events + 1] = event
end

-- Grant moves as an event field: `<grant id>:<units>,...`.
local function moves_text(moves)
  local parts = {}
  for _, mv in ipairs(moves) do parts[#parts + 1] = mv.g .. ':' .. int_text(mv.n) end
  return table.concat(parts, ',')
end
