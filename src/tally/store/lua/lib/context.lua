--! include: codec fence
-- context: one script run's state and the account it works on.
-- Nothing here writes to Redis: every change is made in memory on ctx and
-- written by commit_ctx (write_phase) once every check has passed.
--
-- ctx = {now (the account's clock once it is loaded), prefix, shard, acct,
--        acct_key, holds_key, expiries_key, events_key, closings_key, fence_key,
--        usage_keys = {the account's two usage counter slots}, held_key,
--        reservation_keys = {rid -> key of the reservations the request names},
--        legacy_keys = {rid -> own key of a held record an earlier release kept},
--        events = {},
--        holds = {rid -> hold loaded}, dirty = {rid -> true for holds to write},
--        usage = {counter changes}, idem = the idempotency record to write,
--        retention_ms, closed_window_ms, quote_validity_ms,
--        accounts = {acct_key -> account} and prices = {} when a batch shares its
--        decoded accounts and price records between items (lib/batch.lua)}

-- The shard's part of a ctx, from the request and the shard's declared keys
-- {expiries, events, closings, fence}: checked once per script run (a batch
-- runs many items on it), the shard's fence checked with it.
local function shard_state(req, expiries_key, events_key, closings_key, fence_key)
  local shard = {
    expiries_key = expiries_key, events_key = events_key, closings_key = closings_key,
    fence_key = fence_key,
    prefix = check_str(req.prefix, 'prefix', KEY_PREFIX_BYTES_MAX),
    shard = check_str(req.shard, 'shard', SHARD_TAG_BYTES_MAX),
    retention_ms = check_int(req.retention_ms or 0, 'retention_ms', 0, TIMESTAMP_MS_MAX),
    closed_window_ms = check_int(req.closed_window_ms or 0, 'closed_window_ms', 0, TIMESTAMP_MS_MAX),
    -- spend scripts only; pricing checks it when a superseded version is quoted
    quote_validity_ms = req.quote_validity_ms,
  }
  check_fence(shard, req.fence_floor)
  return shard
end

-- A ctx on one account of the shard: account_keys are 1 account blob,
-- 2 account holds zset, 3-4 the account's usage counter slots (lib/usage.lua),
-- 5 the account's held reservations hash (lib/holds.lua).
local function account_ctx(shard, now, account_keys)
  return {
    now = now, prefix = shard.prefix, shard = shard.shard, fence_key = shard.fence_key,
    expiries_key = shard.expiries_key, events_key = shard.events_key,
    closings_key = shard.closings_key,
    acct_key = account_keys[1], holds_key = account_keys[2],
    usage_keys = {account_keys[3], account_keys[4]}, held_key = account_keys[5],
    reservation_keys = {}, legacy_keys = {}, events = {}, holds = {}, dirty = {}, usage = {},
    retention_ms = shard.retention_ms, closed_window_ms = shard.closed_window_ms,
    quote_validity_ms = shard.quote_validity_ms,
  }
end

-- An account script's ctx: its KEYS 1-9 are 1 account blob, 2 account holds
-- zset, 3 shard expiries zset, 4 shard event stream, 5 shard closings zset,
-- 6 shard fence hash, 7-8 the account's usage counter slots, 9 the account's
-- held reservations hash (ACCOUNT_KEYS of them).
local ACCOUNT_KEYS = 9
local function new_ctx(req, keys)
  return account_ctx(shard_state(req, keys[3], keys[4], keys[5], keys[6]), req.now,
    {keys[1], keys[2], keys[7], keys[8], keys[9]})
end

-- Fields added after an account was first written get their neutral value.
local function upgrade(acct)
  acct.event_seq = acct.event_seq or 0
  acct.period_purchased = acct.period_purchased or 0
  acct.period_expired = acct.period_expired or 0
  acct.alerts = acct.alerts or {percent = {}, below = 0, overage = false}
  acct.fired = acct.fired or {}
  acct.budgets = acct.budgets or {}
  acct.clock = acct.clock or 0
  -- the highest reservation sequence issued (ids made before from seq)
  acct.rid_seq = acct.rid_seq or acct.seq
end

-- Makes acct the account ctx works on, on the account's clock: the latest
-- now a script used on it. Servers' clocks differ slightly; a script whose
-- clock is behind uses the account's instead, so that nothing it does
-- (expiries, periods, idempotency lapses, event times) goes back in time.
local function adopt_account(ctx, acct)
  upgrade(acct)
  if acct.clock > ctx.now then ctx.now = acct.clock end
  acct.clock = ctx.now
  ctx.acct = acct
end

-- A batch decodes each account once: its items share the account as the
-- last item left it (written by that item's commit_ctx; lib/batch.lua drops
-- it when an item fails, since a failed item may have changed it in memory).
local function load_account(ctx, account_id)
  local accounts = ctx.accounts
  local acct = accounts and accounts[ctx.acct_key] or load_blob(ctx.acct_key)
  if not acct then raise('NOT_FOUND', 'account_id', 'account ' .. account_id .. ' not found') end
  if accounts then accounts[ctx.acct_key] = acct end
  adopt_account(ctx, acct)
  return acct
end

-- Ids of grants come from one counter per account (seq); a reservation's id
-- is made by the store before the call (its record's key is declared).
local function next_seq(acct)
  acct.seq = acct.seq + 1
  return acct.seq
end
