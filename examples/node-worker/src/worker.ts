// A Tally worker in TypeScript: every step of the hot path over real gRPC,
// each checked against GetBalance to the unit, one line printed per step.
// Exits 1 at the first check or call that fails.

import { randomUUID } from "node:crypto";
import { createServer as createHttp2Server, type Http2Session } from "node:http2";
import { parseArgs, type ParseArgsConfig } from "node:util";

import { create, fromBinary } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createClient,
  type CallOptions,
  type Client,
  type Interceptor,
} from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { AccountService } from "./gen/tally/v1/account_pb.js";
import { InsufficientUnitsSchema, type Balance } from "./gen/tally/v1/common_pb.js";
import {
  QuotaService,
  ReserveRequestSchema,
  type ReserveRequest,
  type ReserveResponse,
} from "./gen/tally/v1/quota_pb.js";
import { loadRetryPolicy, withRetry, type RetryPolicy } from "./retry.js";

const USAGE = `usage: node dist/worker.js [--target host:port] [--token T] [--account ID]
  [--operation OP] [--allotment UNITS] [--timeout-ms MS] [--service-config PATH]

Without --account it creates an account of its own. With --account, the checks
assume nothing else spends from that account while the worker runs.`;

interface Options {
  target: string;
  token: string | undefined;
  account: string | undefined;
  operation: string;
  allotment: bigint;
  timeoutMs: number;
  serviceConfig: string | URL;
}

function parseArgsOrUsage<T extends ParseArgsConfig>(config: T): ReturnType<typeof parseArgs<T>> {
  try {
    return parseArgs(config);
  } catch (reason) {
    throw new Error(`${reason instanceof Error ? reason.message : String(reason)}\n${USAGE}`);
  }
}

function options(argv: string[]): Options {
  const { values } = parseArgsOrUsage({
    args: argv,
    strict: true,
    options: {
      target: { type: "string", default: "127.0.0.1:50051" },
      token: { type: "string" },
      account: { type: "string" },
      operation: { type: "string", default: "image.upscale" },
      allotment: { type: "string", default: "1000" },
      "timeout-ms": { type: "string", default: "5000" },
      "service-config": { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const timeoutMs = Number(values["timeout-ms"]);
  if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) {
    throw new Error(`--timeout-ms must be a positive integer, not ${values["timeout-ms"]}`);
  }
  if (!/^[1-9]\d*$/.test(values.allotment)) {
    throw new Error(`--allotment must be a positive integer, not ${values.allotment}`);
  }
  return {
    target: values.target,
    token: values.token ?? (process.env["TALLY_TOKEN"] || undefined),
    account: values.account,
    operation: values.operation,
    allotment: BigInt(values.allotment),
    timeoutMs,
    // By default the repository's published config: dist/ is examples/node-worker/dist/.
    serviceConfig:
      values["service-config"] ??
      new URL("../../../protos/tally/v1/service_config.json", import.meta.url),
  };
}

function bearer(token: string): Interceptor {
  return (next) => async (request) => {
    request.header.set("authorization", `Bearer ${token}`);
    return next(request);
  };
}

/** The two services, and every call made under a deadline with the retry policy. */
class Tally {
  readonly quota: Client<typeof QuotaService>;
  readonly accounts: Client<typeof AccountService>;

  constructor(
    target: string,
    readonly policy: RetryPolicy,
    readonly timeoutMs: number,
    interceptors: Interceptor[],
  ) {
    // gRPC over HTTP/2 without TLS (Tally's default on loopback).
    const transport = createGrpcTransport({ baseUrl: `http://${target}`, interceptors });
    this.quota = createClient(QuotaService, transport);
    this.accounts = createClient(AccountService, transport);
  }

  /** One logical call: retried on UNAVAILABLE, all attempts within timeoutMs. */
  call<T>(send: (options: CallOptions) => Promise<T>): Promise<T> {
    const deadline = performance.now() + this.timeoutMs;
    return withRetry(this.policy, deadline, (timeoutMs) => send({ timeoutMs }));
  }

  async balance(accountId: string): Promise<Balance> {
    const reply = await this.call((o) => this.quota.getBalance({ accountId }, o));
    return present(reply.balance, "GetBalanceResponse.balance");
  }

  async reserve(request: ReserveRequest): Promise<ReserveResponse> {
    return this.call((o) => this.quota.reserve(request, o));
  }
}

function present<T>(value: T | undefined, what: string): T {
  if (value === undefined) {
    throw new Error(`${what} is missing`);
  }
  return value;
}

function expect<T extends bigint | string | boolean | number>(what: string, actual: T, expected: T): void {
  if (actual !== expected) {
    throw new Error(`check failed: ${what}: expected ${expected}, got ${actual}`);
  }
}

/** A Reserve under a key of its own; the request (and key) is made once. */
function reserveRequest(accountId: string, operation: string, quantity: bigint): ReserveRequest {
  return create(ReserveRequestSchema, {
    accountId,
    operation,
    quantity,
    idempotencyKey: `node-worker-${randomUUID()}`,
    labels: { worker: "node-example" },
  });
}

async function openAccount(tally: Tally, opts: Options): Promise<string> {
  if (opts.account !== undefined) {
    const accountId = opts.account;
    await tally.call((o) => tally.accounts.getAccount({ accountId }, o));
    const balance = await tally.balance(accountId);
    console.log(`account ${accountId}: existing, available ${balance.available}`);
    return accountId;
  }
  const accountId = `node-worker-${randomUUID().slice(0, 8)}`;
  // CreateAccount is idempotent by account id: a retry answers replayed.
  await tally.call((o) =>
    tally.accounts.createAccount({ accountId, monthlyAllotment: opts.allotment }, o),
  );
  const balance = await tally.balance(accountId);
  expect("available after creation", balance.available, opts.allotment);
  console.log(`account ${accountId}: created, available ${balance.available}`);
  return accountId;
}

/** The price of one unit of quantity, from Quote (which moves nothing). */
async function unitPrice(tally: Tally, accountId: string, operation: string): Promise<bigint> {
  const quote = await tally.call((o) => tally.quota.quote({ accountId, operation, quantity: 1n }, o));
  expect("Quote units for quantity 1", quote.units, quote.unitsPerQuantity);
  console.log(`quote: ${operation} costs ${quote.unitsPerQuantity} units per quantity`);
  return quote.unitsPerQuantity;
}

async function reserveCommit(tally: Tally, accountId: string, operation: string, price: bigint): Promise<void> {
  const before = await tally.balance(accountId);
  const hold = await tally.reserve(reserveRequest(accountId, operation, 2n));
  expect("units held", hold.units, 2n * price);
  expect("available while held", present(hold.balance, "balance").available, before.available - 2n * price);
  // No quantity: the whole hold is charged.
  const commit = await tally.call((o) => tally.quota.commit({ reservationId: hold.reservationId }, o));
  expect("units charged", commit.unitsCharged, hold.units);
  expect("units released", commit.unitsReleased, 0n);
  const after = await tally.balance(accountId);
  expect("available after commit", after.available, before.available - hold.units);
  expect("held after commit", after.held, before.held);
  console.log(
    `reserve+commit: held ${hold.units}, charged ${commit.unitsCharged}, ` +
      `available ${before.available} -> ${after.available}`,
  );
}

async function reservePartialCommit(
  tally: Tally, accountId: string, operation: string, price: bigint,
): Promise<void> {
  const before = await tally.balance(accountId);
  const hold = await tally.reserve(reserveRequest(accountId, operation, 3n));
  expect("units held", hold.units, 3n * price);
  // Only one of the three was delivered: the other two go back.
  const commit = await tally.call((o) =>
    tally.quota.commit({ reservationId: hold.reservationId, quantity: 1n }, o),
  );
  expect("units charged", commit.unitsCharged, price);
  expect("units released", commit.unitsReleased, 2n * price);
  const after = await tally.balance(accountId);
  expect("available after partial commit", after.available, before.available - price);
  expect("held after partial commit", after.held, before.held);
  console.log(
    `reserve+partial commit: held ${hold.units}, charged ${commit.unitsCharged}, ` +
      `released ${commit.unitsReleased}, available ${before.available} -> ${after.available}`,
  );
}

async function reserveRefund(tally: Tally, accountId: string, operation: string, price: bigint): Promise<void> {
  const before = await tally.balance(accountId);
  const hold = await tally.reserve(reserveRequest(accountId, operation, 2n));
  expect("units held", hold.units, 2n * price);
  const idempotencyKey = `node-worker-${randomUUID()}`;
  const refund = await tally.call((o) =>
    tally.quota.refund({ reservationId: hold.reservationId, idempotencyKey, reason: "work failed" }, o),
  );
  expect("units refunded", refund.unitsRefunded, hold.units);
  const after = await tally.balance(accountId);
  expect("available after refund", after.available, before.available);
  expect("held after refund", after.held, before.held);
  console.log(
    `reserve+refund: held ${hold.units}, refunded ${refund.unitsRefunded}, ` +
      `available ${before.available} -> ${after.available}`,
  );
}

async function refused(send: () => Promise<unknown>): Promise<ConnectError> {
  try {
    await send();
  } catch (reason) {
    return ConnectError.from(reason);
  }
  throw new Error("check failed: the call succeeded, expected an error");
}

async function insufficientUnits(
  tally: Tally, accountId: string, operation: string, price: bigint,
): Promise<void> {
  const before = await tally.balance(accountId);
  const quantity = before.available / price + 1n; // one more than the balance covers
  const error = await refused(() => tally.reserve(reserveRequest(accountId, operation, quantity)));
  if (error.code !== Code.ResourceExhausted) {
    throw error;
  }
  // grpc-status-details-bin: a google.rpc.Status whose details carry InsufficientUnits.
  const details = error.findDetails(InsufficientUnitsSchema);
  expect("InsufficientUnits details", details.length, 1);
  const detail = present(details[0], "InsufficientUnits");
  expect("InsufficientUnits.account_id", detail.accountId, accountId);
  expect("InsufficientUnits.required", detail.required, quantity * price);
  if (detail.budgetId === "") {
    expect("InsufficientUnits.available", detail.available, before.available);
  }
  const after = await tally.balance(accountId);
  expect("available after the refusal", after.available, before.available);
  expect("held after the refusal", after.held, before.held);
  console.log(
    `insufficient: Reserve of ${quantity} x ${operation} refused with RESOURCE_EXHAUSTED, ` +
      `available=${detail.available} required=${detail.required} budget_id=${JSON.stringify(detail.budgetId)}`,
  );
}

async function replayedReserve(tally: Tally, accountId: string, operation: string, price: bigint): Promise<void> {
  const before = await tally.balance(accountId);
  const request = reserveRequest(accountId, operation, 1n);
  const first = await tally.reserve(request);
  // What a client does when the first answer was lost: the same request, same key.
  const again = await tally.reserve(request);
  expect("first Reserve replayed", first.replayed, false);
  expect("second Reserve replayed", again.replayed, true);
  expect("reservation id of the replay", again.reservationId, first.reservationId);
  expect("units of the replay", again.units, first.units);
  const held = await tally.balance(accountId);
  expect("available after two Reserves with one key", held.available, before.available - price);
  expect("held after two Reserves with one key", held.held, before.held + price);
  const idempotencyKey = `node-worker-${randomUUID()}`;
  await tally.call((o) =>
    tally.quota.refund({ reservationId: first.reservationId, idempotencyKey, reason: "demo" }, o),
  );
  const after = await tally.balance(accountId);
  expect("available after the release", after.available, before.available);
  console.log(
    `replay: the same idempotency key answered reservation ${first.reservationId} again ` +
      `(replayed=true), held once: available ${before.available} -> ${held.available}, ` +
      `released -> ${after.available}`,
  );
}

/**
 * A stand-in for a Tally that cannot serve now (Redis unreachable): it answers
 * every call UNAVAILABLE and keeps the idempotency key of each Reserve it got.
 */
async function unavailableTally(): Promise<{ address: string; keys: string[]; close: () => void }> {
  const keys: string[] = [];
  const sessions = new Set<Http2Session>();
  const server = createHttp2Server();
  server.on("session", (session) => {
    sessions.add(session);
    session.on("close", () => sessions.delete(session));
  });
  server.on("stream", (stream) => {
    const chunks: Buffer[] = [];
    stream.on("data", (chunk: Buffer) => chunks.push(chunk));
    stream.on("end", () => {
      // One uncompressed gRPC frame: a flag byte, a 4-byte length, the message.
      const body = Buffer.concat(chunks);
      keys.push(fromBinary(ReserveRequestSchema, body.subarray(5, 5 + body.readUInt32BE(1))).idempotencyKey);
      stream.respond(
        { ":status": 200, "content-type": "application/grpc", "grpc-status": "14", "grpc-message": "redis unreachable" },
        { endStream: true },
      );
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const bound = server.address();
  if (bound === null || typeof bound === "string") {
    throw new Error(`unexpected listening address ${String(bound)}`);
  }
  const close = (): void => {
    server.close();
    // The client keeps its connection open: close it from this side too.
    for (const session of sessions) {
      session.destroy();
    }
  };
  return { address: `127.0.0.1:${bound.port}`, keys, close };
}

async function unavailableRetries(
  policy: RetryPolicy, timeoutMs: number, accountId: string, operation: string,
): Promise<void> {
  const { address, keys, close } = await unavailableTally();
  try {
    const down = new Tally(address, policy, timeoutMs, []);
    const request = reserveRequest(accountId, operation, 1n);
    const error = await refused(() => down.reserve(request));
    expect("status after every attempt", Code[error.code], Code[Code.Unavailable]);
    expect("attempts", keys.length, policy.maxAttempts);
    expect("distinct idempotency keys received", new Set(keys).size, 1);
    expect("idempotency key received", keys[0], request.idempotencyKey);
    console.log(
      `unavailable: a server answering UNAVAILABLE got ${keys.length} attempts with one ` +
        `idempotency key, then the worker gave up within the ${timeoutMs} ms deadline`,
    );
    const late = await refused(() =>
      withRetry(policy, performance.now(), (ms) => down.quota.reserve(request, { timeoutMs: ms })),
    );
    expect("status of a call past its deadline", Code[late.code], Code[Code.DeadlineExceeded]);
    expect("attempts past the deadline", keys.length, policy.maxAttempts);
    console.log("deadline: a call whose deadline has passed is not sent (DEADLINE_EXCEEDED)");
  } finally {
    close();
  }
}

async function main(): Promise<void> {
  const opts = options(process.argv.slice(2));
  const policy = loadRetryPolicy(opts.serviceConfig);
  const interceptors = opts.token === undefined ? [] : [bearer(opts.token)];
  const tally = new Tally(opts.target, policy, opts.timeoutMs, interceptors);
  console.log(`target ${opts.target}: retry UNAVAILABLE up to ${policy.maxAttempts} attempts, deadline ${opts.timeoutMs} ms per call`);
  const accountId = await openAccount(tally, opts);
  const price = await unitPrice(tally, accountId, opts.operation);
  await reserveCommit(tally, accountId, opts.operation, price);
  await reservePartialCommit(tally, accountId, opts.operation, price);
  await reserveRefund(tally, accountId, opts.operation, price);
  await insufficientUnits(tally, accountId, opts.operation, price);
  await replayedReserve(tally, accountId, opts.operation, price);
  await unavailableRetries(policy, opts.timeoutMs, accountId, opts.operation);
  const b = await tally.balance(accountId);
  console.log(
    `balance ${accountId}: available=${b.available} held=${b.held} ` +
      `charged_total=${b.unitsChargedTotal} refunded_total=${b.unitsRefundedTotal}`,
  );
  console.log("ok");
}

main().catch((reason: unknown) => {
  const text = reason instanceof ConnectError ? `${Code[reason.code]}: ${reason.rawMessage}` : String(reason);
  console.error(`node-worker failed: ${text}`);
  process.exitCode = 1;
});
