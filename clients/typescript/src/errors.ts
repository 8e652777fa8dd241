/**
 * The errors the client raises. Every one is a {@link SyncdError}, so one `instanceof` check
 * catches them all:
 *
 * ```
 * SyncdError
 * ├── ReducerError       the server said no to a call or merge (3xxx, or a 2xxx refusal); nothing was committed
 * ├── InternalError      the server failed (5xxx); retrying later, with the same idempotency key, may succeed
 * ├── SubscriptionError  a query set was refused or dropped (bad SQL, forbidden, limits)
 * ├── QueryError         a one-off `sql()` query was refused
 * ├── ProtocolViolation  the server sent something this client cannot read (a bug, or a stale schema)
 * ├── StaleBindingsError the server's schema changed in a way the generated bindings do not allow
 * └── ConnectionError    the connection ended for good (or never came up) while a request waited
 * ```
 *
 * Wire error codes are plain numbers (docs/protocol.md §9.1); a code this client does not know
 * is still reported, and {@link isRetryable} classifies it by its range.
 */

/** The wire error codes of docs/protocol.md §9.1, by name. */
export const ErrorCode = {
  PROTOCOL: 1000,
  UNKNOWN_MESSAGE: 1001,
  MESSAGE_TOO_LARGE: 1002,
  UNAUTHORIZED: 2000,
  FORBIDDEN: 2001,
  RATE_LIMITED: 2002,
  LIMIT_EXCEEDED: 2003,
  SERVER_FULL: 2004,
  REDUCER_FAILED: 3000,
  BAD_ARGUMENTS: 3001,
  NO_SUCH_REDUCER: 3002,
  CONSTRAINT: 3003,
  REDUCER_TIMEOUT: 3004,
  BAD_QUERY: 3100,
  INTERNAL: 5000,
  UNAVAILABLE: 5001,
} as const;

/** The close codes of docs/protocol.md §9.2, by name. */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  ABNORMAL: 1006,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SHUTDOWN: 4000,
  SLOW_CONSUMER: 4001,
  REAUTHENTICATE: 4002,
  LEADER_CHANGED: 4003,
  SERVER_FULL: 4004,
  SCHEMA_CHANGED: 4005,
  UNAUTHORIZED: 4500,
  FORBIDDEN: 4501,
  REJECTED: 4502,
  BAD_REQUEST: 4503,
} as const;

/** The name of a known error code (`"REDUCER_FAILED"`), or `"UNKNOWN"`. */
export function errorCodeName(code: number): string {
  for (const [name, value] of Object.entries(ErrorCode)) {
    if (value === code) return name;
  }
  return "UNKNOWN";
}

/**
 * Whether a request that failed with `code` may succeed if sent again later (§9.1): 2002, 2004
 * and 5xxx are retryable; 1xxx, 3xxx and the other 2xxx are not. Unknown codes go by their range.
 */
export function isRetryable(code: number): boolean {
  return code === ErrorCode.RATE_LIMITED || code === ErrorCode.SERVER_FULL || (code >= 5000 && code <= 5999);
}

/** The base class of every error this package raises. */
export class SyncdError extends Error {
  /** The wire error code (§9.1), or null when the error did not come from the server. */
  readonly code: number | null;

  constructor(message: string, code: number | null = null) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    // Keep `instanceof` working when compiled down to ES5-style classes.
    Object.setPrototypeOf(this, new.target.prototype);
  }

  /** The code's name (`"BAD_QUERY"`), `"UNKNOWN"` for a code this client does not know. */
  get codeName(): string | null {
    return this.code === null ? null : errorCodeName(this.code);
  }

  /** Whether sending the same request again later may succeed (§9.1). */
  get retryable(): boolean {
    return this.code !== null && isRetryable(this.code);
  }
}

/**
 * A reducer call or merge that the server refused or whose reducer raised: nothing was committed.
 * `code` is the server's code (`REDUCER_FAILED` 3000, `BAD_ARGUMENTS` 3001, `NO_SUCH_REDUCER`
 * 3002, `CONSTRAINT` 3003, `REDUCER_TIMEOUT` 3004, `FORBIDDEN` 2001, `RATE_LIMITED` 2002, ...) and `message` the server's
 * message (the reducer's own for `REDUCER_FAILED`).
 */
export class ReducerError extends SyncdError {
  declare readonly code: number;
  /** The reducer that was called (`"merge"` for a merge). */
  readonly reducer: string;

  constructor(reducer: string, code: number, message: string) {
    super(message, code);
    this.reducer = reducer;
  }
}

/**
 * The server failed (`INTERNAL` 5000, `UNAVAILABLE` 5001, or another 5xxx). The call may or may
 * not have been applied: call again with the same `idempotencyKey` to find out without running
 * it twice.
 */
export class InternalError extends SyncdError {
  declare readonly code: number;
  /** The idempotency key of the failed call, when the error answers a call. */
  readonly idempotencyKey: string | null;

  constructor(code: number, message: string, idempotencyKey: string | null = null) {
    super(message, code);
    this.idempotencyKey = idempotencyKey;
  }
}

/** A query set the server refused (`request_id` set) or dropped later (after a resume, say). */
export class SubscriptionError extends SyncdError {
  declare readonly code: number;
  /** The set's queries. */
  readonly queries: readonly string[];

  constructor(code: number, message: string, queries: readonly string[]) {
    super(message, code);
    this.queries = queries;
  }
}

/** A one-off `sql()` query the server refused (`BAD_QUERY`, `FORBIDDEN`, `LIMIT_EXCEEDED`). */
export class QueryError extends SyncdError {
  declare readonly code: number;
  readonly query: string;

  constructor(code: number, message: string, query: string) {
    super(message, code);
    this.query = query;
  }
}

/** The server sent a message this client cannot make sense of (or the schema is stale). */
export class ProtocolViolation extends SyncdError {}

/**
 * The generated bindings (`connect({ bindings })`, which `connectTyped` passes) are older than the
 * server's schema in a way that matters: a table, column or reducer they use is gone, a column's
 * type or a reducer's parameters changed. Additions never count: old bindings keep working.
 * `connect` rejects with it; after a later migration (seen on reconnect) it goes to `onError`
 * and stays in `client.staleBindings`. Regenerate the bindings (`syncd generate typescript`).
 */
export class StaleBindingsError extends SyncdError {
  /** One line per difference, e.g. `column item.name was removed`. */
  readonly differences: readonly string[];
  /** The server's stored schema version, when it reports one. */
  readonly schemaVersion: number | null;

  constructor(differences: readonly string[], schemaVersion: number | null) {
    const at = schemaVersion !== null ? ` (schema version ${schemaVersion})` : "";
    super(`the server's schema${at} no longer matches these bindings (regenerate them): ${differences.join("; ")}`);
    this.differences = [...differences];
    this.schemaVersion = schemaVersion;
  }
}

/**
 * The connection ended for good, or could not be opened, while something waited on it.
 * `closeCode` and `reason` are the WebSocket close code and reason when there was one (1006 for a
 * connection lost without a close frame). A call rejected with it carries its `idempotencyKey`:
 * call again with it and the reducer runs at most once.
 */
export class ConnectionError extends SyncdError {
  readonly closeCode: number | null;
  readonly reason: string;
  readonly idempotencyKey: string | null;

  constructor(
    message: string,
    options: { closeCode?: number | null; reason?: string; code?: number | null; idempotencyKey?: string | null } = {},
  ) {
    super(message, options.code ?? null);
    this.closeCode = options.closeCode ?? null;
    this.reason = options.reason ?? "";
    this.idempotencyKey = options.idempotencyKey ?? null;
  }
}

/** The error a failed `ReducerResult` turns into: 5xxx is {@link InternalError}, else {@link ReducerError}. */
export function reducerFailure(reducer: string, code: number, message: string, idempotencyKey: string | null): SyncdError {
  if (code >= 5000 && code <= 5999) return new InternalError(code, message, idempotencyKey);
  return new ReducerError(reducer, code, message);
}
