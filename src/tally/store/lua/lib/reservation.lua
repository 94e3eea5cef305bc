--! include: codec context holds
-- reservation: the opening commit, refund and extend share: the account and
-- the hold a reservation id names.

-- A new ctx with the account loaded (ctx.acct) and the reservation id checked;
-- returns ctx and the id.
local function open_reservation(req, keys)
  local ctx = new_ctx(req, keys)
  load_account(ctx, check_str(req.account_id, 'account_id', ACCOUNT_ID_BYTES_MAX))
  return ctx, check_str(req.reservation_id, 'reservation_id', RESERVATION_ID_BYTES_MAX)
end

local function find_hold(ctx, rid)
  local hold = load_hold(ctx, rid)
  if not hold then raise('NOT_FOUND', 'reservation_id', 'reservation ' .. rid .. ' not found') end
  return hold
end
