--! include: codec context holds
-- reservation: the opening commit, refund and extend share: the account and
-- the hold a reservation id names.

-- Loads the request's account on ctx (ctx.acct) and checks the reservation id;
-- key: the reservation's own key (declared). Returns the id.
local function open_reservation_on(ctx, req, key)
  load_account(ctx, check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX))
  local rid = check_str(req.reservation_id, 'reservation_id', RESERVATION_ID_BYTES_MAX)
  name_reservation(ctx, rid, key)
  return rid
end

-- A new ctx with the account loaded (ctx.acct) and the reservation id checked;
-- keys: the script's KEYS, the reservation's own key the one after the account's.
-- Returns ctx and the id.
local function open_reservation(req, keys)
  local ctx = new_ctx(req, keys)
  return ctx, open_reservation_on(ctx, req, keys[ACCOUNT_KEYS + 1])
end

local function not_found(rid)
  raise('NOT_FOUND', 'reservation_id', 'reservation ' .. rid .. ' not found')
end

-- The hold a reservation id names, unless reservation_retention has passed
-- since it closed (NOT_FOUND). One the account has issued that is no
-- longer in Redis (closed, past the closed window) is NOT_IN_STORE: the caller
-- brings the ledger's image back (restore_hold) and calls again. The reply
-- carries the account's event sequence, so the caller can tell whether the
-- ledger has every event of the account yet.
local function find_hold(ctx, rid)
  local hold = load_hold(ctx, rid)
  if hold then
    -- kept reservation_retention from its close (a due hold closes when it expires)
    local closed_at = hold.state == 'HELD' and hold.expires_at or hold.closed_at
    if closed_at + ctx.retention_ms <= ctx.now then not_found(rid) end
    return hold
  end
  local seq = tonumber(string.match(rid, '^[^.]+%.(%d+)%.'))
  if not seq or seq > ctx.acct.rid_seq then not_found(rid) end
  raise('NOT_IN_STORE', 'reservation_id', 'reservation ' .. rid .. ' is not in Redis',
    {event_seq = ctx.acct.event_seq})
end
