--! include: codec reservation holds
-- restore_hold: brings a closed reservation's record back from the ledger's
-- image of it, atomically and only if it is not in Redis (absent, or past its
-- closed window): then it is kept for the closed window again. The caller
-- reads the image once the ledger has every event of the account that could
-- have changed it. Restores nothing older than retention_ms (NOT_FOUND, as a
-- reservation unknown to both).
-- KEYS: 1-9 the account keys (lib/context.lua, new_ctx): 1 account blob, 2 account
--   holds zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
--   6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's held
--   reservations hash
--   10 the reservation's own key
-- ARGV[1] (msgpack): now, account_id, prefix, shard, retention_ms, closed_window_ms, fence_floor,
--   reservation_id, image (the record, as the ledger keeps it)
-- Returns: {restored (false: it was in Redis already)}.

return run(function()
  local req = decode_request()
  local ctx, rid = open_reservation(req, KEYS)
  if load_hold(ctx, rid) then return {restored = false} end
  local hold = req.image
  if type(hold) ~= 'table' or hold.id ~= rid or hold.state == 'HELD' then
    error('restore_hold: the image of ' .. rid .. ' is not a closed reservation', 0)
  end
  if hold.closed_at + ctx.retention_ms <= ctx.now then not_found(rid) end
  keep_closed(ctx, rid, hold, ctx.reservation_keys[rid])
  return {restored = true}
end)
