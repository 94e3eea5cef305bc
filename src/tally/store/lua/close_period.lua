--! include: codec context periods closings write_phase
-- close_period: the period sweeper's step for one account whose closing is
-- due: the touch a write does (overage invoiced, unused allotment and other
-- due grants expired, the next allotment granted, due holds expired), then
-- the account's next closing indexed. A second close is a no-op.
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor
-- Returns: {events = number of events the close wrote}.

return run(function()
  local req = decode_request()
  local ctx = new_ctx(req, KEYS)
  local account_id = check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX)
  local acct = load_blob(ctx.acct_key)
  if not acct then
    redis.call('ZREM', ctx.closings_key, account_id)
    return {events = 0}
  end
  adopt_account(ctx, acct)
  touch(ctx)
  local events = #ctx.events
  commit_ctx(ctx)  -- indexes the next closing of an account it writes
  if events == 0 then
    -- A period that rolled without an event (no allotment, no overage) is not
    -- written: the index still moves on to the next closing.
    index_closing(ctx)
  end
  return {events = events}
end)
