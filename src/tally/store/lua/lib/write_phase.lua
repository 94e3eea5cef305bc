--! include: codec books alerts holds usage closings fence
-- write_phase: commit_ctx, the one place a script run's changes are written
-- (a script calls it once, after every check has passed: "check everything,
-- then write").

-- The last event carries images of the account, the holds and the
-- idempotency record as written (`_acct`, `_holds`, `_idem`), so the ledger
-- can restore Redis from events alone. Its available_after is the figure the
-- books were checked with: ledger snapshots take it from there rather than
-- compute the formula again. Returns the stream ids of the events.
local function commit_ctx(ctx)
  local acct = ctx.acct
  check_alerts(ctx)
  check_running_totals(acct)
  local available_units = assert_books(acct)
  if #ctx.events == 0 then
    -- Nothing moved (e.g. refunding what is already refunded): every change of
    -- the account or a hold emits an event, so only the answer is kept.
    if next(ctx.dirty) ~= nil or #ctx.usage > 0 then error('a change without an event', 0) end
    if ctx.idem then save_blob(ctx.idem.key, ctx.idem.record, ctx.idem.window_ms) end
    return {}
  end
  -- packed once: the blob written is the image the last event carries (nothing
  -- below changes the account before the image is taken)
  local acct_image = cmsgpack.pack(acct)
  redis.call('SET', ctx.acct_key, acct_image)
  index_closing(ctx)
  local hold_images = write_holds(ctx)
  local last = ctx.events[#ctx.events]
  -- emit() puts available_after last; snapshots rely on it being this figure
  if last[#last] ~= int_text(available_units) then
    error(string.format('available_after %d of %s is not the checked %d', last[#last], acct.id,
      available_units), 0)
  end
  last[#last + 1] = '_acct'
  last[#last + 1] = acct_image
  if hold_images then
    last[#last + 1] = '_holds'
    last[#last + 1] = hold_images
  end
  local idem = ctx.idem
  if idem then
    local record = save_blob(idem.key, idem.record, idem.window_ms)
    last[#last + 1] = '_idem'
    last[#last + 1] = packed_map({cmsgpack.pack('key'), cmsgpack.pack(idem.key),
      cmsgpack.pack('record'), record, cmsgpack.pack('expires_at'), cmsgpack.pack(idem.expires_at)})
  end
  write_usage(ctx)
  stamp_fence(ctx)
  local ids = {}
  for i, event in ipairs(ctx.events) do
    ids[i] = redis.call('XADD', ctx.events_key, '*', unpack(event))
  end
  return ids
end
