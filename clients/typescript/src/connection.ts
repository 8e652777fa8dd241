/**
 * `SyncdClient`: one logical connection to a syncd server that survives dropped sockets.
 *
 * Life of a socket: open -> `Hello` (token, cursor, live query sets) -> every request still
 * waiting, in the order it was made -> `Welcome` -> answers. When the socket drops, the close code
 * decides (docs/protocol.md §9.2): reconnect after a backoff and resume, fetch a fresh token and
 * resume (4002), or stop and fail whatever waits. Requests made while disconnected wait and go out
 * on the next socket; a call keeps its idempotency key, so a call whose first attempt ran but whose
 * answer was lost runs once.
 */
import { Backoff } from "./backoff.js";
import { ClientCache, keyOf, type TableState } from "./cache.js";
import {
  CloseCode,
  ErrorCode,
  ConnectionError,
  ProtocolViolation,
  QueryError,
  StaleBindingsError,
  SubscriptionError,
  SyncdError,
  reducerFailure,
} from "./errors.js";
import { jwtExpiryMs, refreshDelayMs } from "./jwt.js";
import { makeCodec, type ClientMessage, type Codec, type Cursor, type ServerMessage } from "./protocol.js";
import { ClientSchema, schemaUrl, staleDifferences, wsUrl, type SchemaJson } from "./schema.js";
import type { ClientStore, SavedState, SavedWrite } from "./store.js";
import type {
  CallOptions,
  CallResult,
  ConnectInfo,
  ConnectOptions,
  DisconnectInfo,
  SubscriptionHandle,
  TableCache,
  WebSocketConstructor,
  WebSocketLike,
} from "./types.js";

type Timer = ReturnType<typeof setTimeout>;

const WS_OPEN = 1;
// setTimeout's largest delay (2^31-1 ms); longer ones fire at once.
const MAX_TIMER_MS = 2_147_483_647;

/** Whether a close code means "reconnect and resume" (§9.2). 4002 and 4500 are handled apart. */
export function isResumableClose(code: number): boolean {
  return code === 1001 || code === 1005 || code === 1006 || (code >= 1011 && code <= 1014) || (code >= 4000 && code <= 4499);
}

/** A request that waits for its answer, possibly across reconnects. */
interface Pending {
  /** Builds the wire message for a request id (ids are per socket, so a resend gets a new one). */
  build(requestId: number): ClientMessage;
  resolve(msg: ServerMessage): void;
  fail(error: Error): void;
  /** The idempotency key of a call, for the ConnectionError of a call that never got an answer. */
  idempotencyKey: string | null;
  /** False for a subscribe whose set was unsubscribed before it was sent: skip it on resend. */
  stillWanted(): boolean;
}

type SetStatus = "pending" | "live" | "failed" | "unsubscribed";

class QuerySetState implements SubscriptionHandle {
  readonly querySetId: number;
  readonly queries: string[];
  status: SetStatus = "pending";
  lastResumed = false;
  readonly applied: Promise<void>;
  private settleApplied!: { resolve: () => void; reject: (e: SyncdError) => void };
  private appliedSettled = false;
  private readonly errorListeners = new Set<(error: SyncdError) => void>();
  private failure: SyncdError | null = null;
  private readonly client: SyncdClient;

  constructor(client: SyncdClient, querySetId: number, queries: string[]) {
    this.client = client;
    this.querySetId = querySetId;
    this.queries = queries;
    this.applied = new Promise<void>((resolve, reject) => {
      this.settleApplied = { resolve, reject };
    });
    // A failure is also reported through onError/onError option: do not make an unawaited
    // `applied` an unhandled rejection.
    this.applied.catch(() => {});
  }

  markApplied(): void {
    if (this.appliedSettled) return;
    this.appliedSettled = true;
    this.settleApplied.resolve();
  }

  /** The set failed (refused, or dropped later); returns whether anyone listened. */
  markFailed(error: SyncdError): boolean {
    this.status = "failed";
    this.failure = error;
    const hadAppliedWaiter = !this.appliedSettled;
    if (!this.appliedSettled) {
      this.appliedSettled = true;
      this.settleApplied.reject(error);
    }
    for (const cb of [...this.errorListeners]) {
      try {
        cb(error);
      } catch (e) {
        this.client.reportError(e);
      }
    }
    return this.errorListeners.size > 0 || hadAppliedWaiter;
  }

  onError(cb: (error: SyncdError) => void): () => void {
    this.errorListeners.add(cb);
    const failure = this.failure;
    if (failure !== null) void Promise.resolve().then(() => this.errorListeners.has(cb) && cb(failure));
    return () => {
      this.errorListeners.delete(cb);
    };
  }

  unsubscribe(): Promise<void> {
    return this.client.unsubscribeSet(this);
  }
}

/** A connected client. Made by {@link connect}. */
export class SyncdClient {
  private readonly options: ConnectOptions;
  /** Every replica's WebSocket URL, and which one attempts use now. */
  private readonly urls: string[];
  private urlIndex = 0;
  /** URLs the first connection has tried (it rejects only once every one failed). */
  private firstTried = 0;
  private readonly WebSocketImpl: WebSocketConstructor;
  private readonly codec: Codec;
  private schema: ClientSchema;
  /**
   * The stored schema version `schema` was read at (its `schema_version`; else the first
   * Welcome's). A Welcome with another version means a migration: the schema is read again
   * before any row of the new layout is handled.
   */
  private schemaReadAt: number | null;
  /** Messages that arrived while the schema is being read again (handled, in order, after it). */
  private held: ServerMessage[] | null = null;
  /** The size of the frames in `held` (bounded by `heldBytesLimit`). */
  private heldBytes = 0;
  /** Whether `GET /v1/schema` was readable at connect: a failed re-read then drops and retries. */
  private schemaFetched: boolean;
  private staleBindingsValue: StaleBindingsError | null = null;
  /**
   * @internal The most bytes of messages kept waiting while the schema is read again after a
   * migration; past it the socket is dropped (and the read tried again on the next one), so a
   * slow `GET /v1/schema` cannot grow memory without bound. Tests lower it.
   */
  static heldBytesLimit = 64 << 20;
  private readonly cache: ClientCache;
  private readonly backoff: Backoff;
  private readonly reconnectEnabled: boolean;
  private readonly stableMs: number;

  private identityValue: string | null = null;
  private tokenValue: string | null;
  private connectionIdValue: string | null = null;
  private schemaVersionValue: number | null = null;
  /** Where the cached rows stand in the server's log (§8); null until the first Welcome. */
  private cursorValue: Cursor | null = null;

  // The socket of the current attempt, and whether Hello went out on it.
  private ws: WebSocketLike | null = null;
  private helloSent = false;
  // Epoch of the current socket's Welcome, and the largest offset received on it.
  private socketEpoch: number | null = null;
  private socketOffset = 0;
  // Query sets listed in this socket's Hello that are not answered yet: the cursor stays put (§8).
  private readonly helloPending = new Set<number>();
  // Requests waiting for their answer, in the order they were made (resent in that order).
  private readonly pending = new Set<Pending>();
  // This socket's request id -> request.
  private readonly byRequestId = new Map<number, Pending>();
  private nextRequestId = 1;
  private nextQuerySetId = 1;
  private nextNonce = 1;
  private readonly pings = new Map<number, { sentAt: number; resolve: (ms: number) => void }>();
  private readonly querySets = new Map<number, QuerySetState>();

  private everConnected = false;
  private closedByUser = false;
  private terminal: ConnectionError | null = null;
  // The last Error message before a close: it explains the close.
  private lastServerError: { code: number; message: string } | null = null;
  // Set when the last close was 4500 and a fresh token is being tried once.
  private retriedAuth = false;
  private reconnectTimer: Timer | null = null;
  // Gives up on a socket that brings no Welcome in time (every attempt, not only the first).
  private welcomeTimer: Timer | null = null;
  // Sends Ping on a quiet connection and drops it when the previous Ping got no Pong.
  private heartbeatTimer: Timer | null = null;
  private awaitingPong = false;
  private stableTimer: Timer | null = null;
  private refreshTimer: Timer | null = null;
  // When getToken was last asked for a proactive refresh (rate limit for short-lived tokens).
  private lastRefreshAt: number | null = null;
  private firstWelcome: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private readonly closedWaiters: Array<() => void> = [];
  private readonly connectListeners = new Set<(info: ConnectInfo) => void>();
  private readonly disconnectListeners = new Set<(info: DisconnectInfo) => void>();

  // `connect({ store })`: where the cache and unsent writes are kept, and the pending save.
  private readonly store: ClientStore | null;
  private saveTimer: Timer | null = null;
  // Saves of writes, in order: a write is sent only once it is saved.
  private storeChain: Promise<void> = Promise.resolve();
  private writeSeq = Date.now() * 1000;
  /**
   * Calls and merges saved before the app last stopped and not answered then, sent again (with
   * their idempotency keys) by this client; each settles as its call would have.
   */
  readonly restored: Array<Promise<CallResult>> = [];

  // Merge helpers: this client's writer id, HLC state and counter totals.
  private writerId = randomId();
  private hlc = { ms: 0, counter: 0 };
  private readonly counterTotals = new Map<string, { p: number; n: number }>();

  /** @internal Use {@link connect}. */
  constructor(options: ConnectOptions, schema: SchemaJson, fetched = false) {
    this.options = options;
    const given = Array.isArray(options.url) ? options.url : [options.url];
    if (given.length === 0) throw new TypeError("connect({ url }) needs at least one URL");
    this.urls = given.map(wsUrl);
    const WebSocketImpl = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (WebSocketImpl === undefined) {
      throw new TypeError("no WebSocket: pass connect({ WebSocket }) (in Node 20, the `ws` package's WebSocket)");
    }
    this.WebSocketImpl = WebSocketImpl;
    this.codec = makeCodec(options.format ?? "msgpack");
    this.schema = new ClientSchema(schema);
    this.schemaReadAt = typeof schema.schema_version === "number" ? schema.schema_version : null;
    this.schemaFetched = fetched;
    this.cache = new ClientCache(this.schema, (e) => this.reportError(e));
    const policy = typeof options.reconnect === "object" ? options.reconnect : {};
    this.reconnectEnabled = options.reconnect !== false;
    this.backoff = new Backoff(policy);
    this.stableMs = policy.stableMs ?? 5_000;
    this.tokenValue = options.token ?? null;
    this.store = options.store ?? null;
    if (options.onConnect) this.connectListeners.add(options.onConnect);
    if (options.onDisconnect) this.disconnectListeners.add(options.onDisconnect);
  }

  /** The client's identity (lowercase hex), from the latest `Welcome`. */
  get identity(): string | null {
    return this.identityValue;
  }

  /** The token in use: the one given, the last from `getToken`, or the one the server minted. Store it to keep an anonymous identity. */
  get token(): string | null {
    return this.tokenValue;
  }

  /** This socket's connection id, from `Welcome`. */
  get connectionId(): string | null {
    return this.connectionIdValue;
  }

  /** The server's stored schema version, from the latest `Welcome` (null before one, or from a server that does not report it). */
  get schemaVersion(): number | null {
    return this.schemaVersionValue;
  }

  /**
   * Set when a migration left the bindings given to `connect({ bindings })` stale in a way that
   * matters (also reported to `onError`); null otherwise. `connect` rejects with it instead.
   */
  get staleBindings(): StaleBindingsError | null {
    return this.staleBindingsValue;
  }

  /** Where the cached rows stand: `{ epoch, offset }` (§8). */
  get cursor(): Cursor | null {
    return this.cursorValue === null ? null : { ...this.cursorValue };
  }

  /** Whether a socket is open and welcomed. */
  get connected(): boolean {
    return this.ws !== null && this.socketEpoch !== null;
  }

  /** Whether the client stopped for good (closed, or a terminal close code). */
  get closed(): boolean {
    return this.closedByUser || this.terminal !== null;
  }

  /** The parsed schema in use. */
  get schemaJson(): SchemaJson {
    return this.schema.json;
  }

  /** The cache of one table. Throws a `ProtocolViolation` for a table the schema does not have. */
  table<Row extends object>(name: string): TableCache<Row> {
    return this.cache.table(name) as unknown as TableCache<Row>;
  }

  /** Called after every `Welcome` (also reconnects). Returns a function that removes it. */
  onConnect(cb: (info: ConnectInfo) => void): () => void {
    this.connectListeners.add(cb);
    return () => this.connectListeners.delete(cb);
  }

  /** Called whenever the socket goes down. Returns a function that removes it. */
  onDisconnect(cb: (info: DisconnectInfo) => void): () => void {
    this.disconnectListeners.add(cb);
    return () => this.disconnectListeners.delete(cb);
  }

  /**
   * Subscribe to a set of queries. Their rows enter the cache (and fire `onInsert`) before
   * `applied` resolves. On a refused set `applied` rejects with a `SubscriptionError` and
   * `onError` callbacks run; a set dropped later (e.g. on resume) runs them too.
   */
  subscribe(queries: string[]): SubscriptionHandle {
    if (!Array.isArray(queries) || queries.length === 0 || queries.some((q) => typeof q !== "string" || q === "")) {
      throw new TypeError("subscribe takes a non-empty array of SQL strings");
    }
    const set = new QuerySetState(this, this.nextQuerySetId++, [...queries]);
    this.querySets.set(set.querySetId, set);
    if (this.terminal !== null || this.closedByUser) {
      set.markFailed(this.closedError());
      return set;
    }
    this.request({
      build: (request_id) => ({ type: "sub", request_id, query_set_id: set.querySetId, queries: set.queries }),
      resolve: () => {},
      fail: (error) => {
        if (set.status !== "pending") return;
        this.failSet(set, error instanceof SyncdError ? error : new SubscriptionError(ErrorCode.BAD_QUERY, error.message, set.queries));
      },
      idempotencyKey: null,
      stillWanted: () => set.status === "pending",
    });
    return set;
  }

  /** @internal */
  unsubscribeSet(set: QuerySetState): Promise<void> {
    if (set.status === "unsubscribed" || set.status === "failed") return Promise.resolve();
    set.status = "unsubscribed";
    set.markApplied();
    // Drop the rows now: updates that still arrive for the set are ignored (§4.3).
    this.cache.batch(() => this.cache.dropSet(set.querySetId));
    this.helloPending.delete(set.querySetId);
    if (this.closed) {
      this.querySets.delete(set.querySetId);
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      this.request({
        build: (request_id) => ({ type: "unsub", request_id, query_set_id: set.querySetId }),
        resolve: () => {
          this.querySets.delete(set.querySetId);
          resolve();
        },
        // The set is gone locally either way; a closed connection holds no sets on the server.
        fail: () => resolve(),
        idempotencyKey: null,
        stillWanted: () => true,
      });
    });
  }

  /**
   * Call a reducer. Resolves once the transaction is durable, and after the cache shows its
   * effects; rejects with a `ReducerError` (the server's code and message), an `InternalError`
   * (5xxx: retry later with the same idempotency key), or a `ConnectionError` (the client
   * stopped before an answer came). A call in flight when the socket dropped is sent again after
   * the reconnect with the same idempotency key, so it applies once.
   */
  call<T = unknown>(reducer: string, args: unknown[], options: CallOptions = {}): Promise<CallResult<T>> {
    if (typeof reducer !== "string" || reducer === "") throw new TypeError("call: reducer must be a non-empty string");
    if (!Array.isArray(args)) throw new TypeError("call: args must be an array");
    const key = options.idempotencyKey ?? `${this.writerId}-${randomId()}`;
    const saved: SavedWrite | null =
      this.store === null ? null : { id: key, seq: this.writeSeq++, kind: "call", reducer, args, idempotencyKey: key };
    return this.savedRequest<T>(saved, () => this.callRequest<T>(reducer, args, key));
  }

  private callRequest<T = unknown>(reducer: string, args: unknown[], key: string): Promise<CallResult<T>> {
    return this.resultRequest<T>(reducer, key, (request_id) => ({ type: "call", request_id, reducer, args, idempotency_key: key }));
  }

  private mergeRequest(table: string, pk: unknown, column: string, op: unknown): Promise<CallResult> {
    return this.resultRequest("merge", null, (request_id) => ({ type: "merge", request_id, table, pk, column, op }));
  }

  /**
   * Merge a CRDT operation into one cell (`MergeCrdt`, protocol §4.5). `op` is in the column
   * type's format: `LWW[T]`: `[value, ms, counter, writer]`; `Counter`: `[[writer, p, n], ...]`.
   * See {@link setLww} and {@link increment} for helpers that build them. Merges commute, so a
   * merge in flight during a drop is simply sent again.
   */
  merge(table: string, pk: unknown, column: string, op: unknown): Promise<CallResult> {
    const saved: SavedWrite | null =
      this.store === null ? null : { id: `m-${randomId()}`, seq: this.writeSeq++, kind: "merge", table, pk, column, op };
    return this.savedRequest(saved, () => this.mergeRequest(table, pk, column, op));
  }

  /**
   * With a store: save `saved` first (in order with other writes), then make the request; forget
   * the write once the server answered it (done or refused), keep it when the client stopped
   * before an answer (it is sent again at the next start).
   */
  private savedRequest<T>(saved: SavedWrite | null, make: () => Promise<CallResult<T>>, alreadySaved = false): Promise<CallResult<T>> {
    const store = this.store;
    if (store === null || saved === null) return make();
    const before = alreadySaved ? this.storeChain : this.storeChain.then(() => store.addWrite(saved));
    this.storeChain = before.catch(() => {});
    const forget = () => {
      store.removeWrite(saved.id).catch((error: unknown) => this.reportError(error));
    };
    return before.then(make).then(
      (result) => {
        forget();
        return result;
      },
      (error: unknown) => {
        if (!(error instanceof ConnectionError)) forget();
        throw error;
      },
    );
  }

  /** @internal Take up a store's state (`rows`: the server's schema is the one they were saved under). */
  restoreFrom(state: SavedState | null, writes: SavedWrite[], rows: boolean): void {
    if (state !== null) {
      if (this.tokenValue === null && state.token !== null) this.tokenValue = state.token;
      if (state.identity !== null) this.identityValue = state.identity;
      if (state.merges !== undefined) {
        // The same writer id and totals: increments made before the restart are not lost.
        this.writerId = state.merges.writerId;
        this.hlc = { ms: state.merges.ms, counter: state.merges.counter };
        for (const [id, p, n] of state.merges.totals) this.counterTotals.set(id, { p, n });
      }
      for (const saved of state.querySets) {
        const set = new QuerySetState(this, saved.querySetId, [...saved.queries]);
        set.status = "live";
        set.markApplied();
        this.querySets.set(set.querySetId, set);
        this.nextQuerySetId = Math.max(this.nextQuerySetId, saved.querySetId + 1);
      }
      if (rows) {
        this.cache.batch(() => {
          for (const saved of state.querySets) {
            for (const h of saved.holders) {
              if (this.schema.tables.has(h.table)) this.cache.restore(saved.querySetId, h.queryIndex, h.table, h.rows);
            }
          }
        });
        this.cursorValue = state.cursor;
      }
    }
    for (const w of writes) {
      this.writeSeq = Math.max(this.writeSeq, w.seq + 1);
      this.adoptTotals(w);
      const make =
        w.kind === "call"
          ? () => this.callRequest(w.reducer, w.args, w.idempotencyKey)
          : () => this.mergeRequest(w.table, w.pk, w.column, w.op);
      const p = this.savedRequest(w, make, true);
      p.catch(() => {}); // settled through `restored`; not an unhandled rejection
      this.restored.push(p);
    }
  }

  /** An unsent increment holds newer totals than the last saved state: continue from them. */
  private adoptTotals(w: SavedWrite): void {
    if (w.kind !== "merge" || !Array.isArray(w.op)) return;
    for (const entry of w.op as unknown[]) {
      if (!Array.isArray(entry) || entry.length !== 3 || entry[0] !== this.writerId) continue;
      const [, p, n] = entry as [string, unknown, unknown];
      if (typeof p !== "number" || typeof n !== "number") continue;
      const id = `${w.table}\u0000${w.column}\u0000${keyOf(w.pk)}`;
      const known = this.counterTotals.get(id) ?? { p: 0, n: 0 };
      this.counterTotals.set(id, { p: Math.max(known.p, p), n: Math.max(known.n, n) });
    }
  }

  /** The live query sets (also those restored from a store). */
  get subscriptions(): SubscriptionHandle[] {
    return [...this.querySets.values()].filter((s) => s.status === "live" || s.status === "pending");
  }

  private saveSoon(): void {
    if (this.store === null || this.saveTimer !== null || this.closed) return;
    this.saveTimer = setTimeout(() => {
      this.saveTimer = null;
      this.saveNow();
    }, 200);
  }

  /** Save rows, live sets and cursor, unless a resume is half done (rows ahead of the cursor). */
  private saveNow(): void {
    const store = this.store;
    if (store === null || this.helloPending.size > 0) return;
    const live = [...this.querySets.values()].filter((s) => s.status === "live");
    const liveIds = new Set(live.map((s) => s.querySetId));
    const holders = new Map<number, SavedState["querySets"][number]["holders"]>();
    for (const d of this.cache.dump()) {
      if (!liveIds.has(d.querySetId)) continue;
      const list = holders.get(d.querySetId) ?? [];
      list.push({ queryIndex: d.queryIndex, table: d.table, rows: d.rows });
      holders.set(d.querySetId, list);
    }
    const state: SavedState = {
      schema: this.schema.json,
      token: this.tokenValue,
      identity: this.identityValue,
      cursor: this.cursorValue,
      querySets: live.map((s) => ({ querySetId: s.querySetId, queries: [...s.queries], holders: holders.get(s.querySetId) ?? [] })),
      merges: {
        writerId: this.writerId,
        ms: this.hlc.ms,
        counter: this.hlc.counter,
        totals: [...this.counterTotals].map(([id, t]) => [id, t.p, t.n] as [string, number, number]),
      },
    };
    store.saveState(state).catch((error: unknown) => this.reportError(error));
  }

  /**
   * Set an `LWW[T]` cell, stamped with this client's hybrid logical clock and writer id. The
   * highest `(ms, counter, writer)` wins, so a device whose clock runs behind loses to one ahead.
   * Stamps are taken one millisecond ahead of the wall clock: clients do not see the stamps of
   * the cells they hold, so a write in the same millisecond as one the server stamped just
   * before (a reducer that created the row) would tie on `ms` and could lose on the writer id.
   */
  setLww(table: string, pk: unknown, column: string, value: unknown): Promise<CallResult> {
    const now = Date.now() + 1;
    this.hlc = now > this.hlc.ms ? { ms: now, counter: 0 } : { ms: this.hlc.ms, counter: this.hlc.counter + 1 };
    return this.merge(table, pk, column, [value, this.hlc.ms, this.hlc.counter, this.writerId]);
  }

  /** Add `delta` (may be negative) to a `Counter` cell, as this client's running totals. */
  increment(table: string, pk: unknown, column: string, delta = 1): Promise<CallResult> {
    if (!Number.isInteger(delta)) throw new TypeError("increment: delta must be an integer");
    const id = `${table}\u0000${column}\u0000${keyOf(pk)}`;
    const totals = this.counterTotals.get(id) ?? { p: 0, n: 0 };
    const next = delta >= 0 ? { p: totals.p + delta, n: totals.n } : { p: totals.p, n: totals.n - delta };
    this.counterTotals.set(id, next);
    return this.merge(table, pk, column, [[this.writerId, next.p, next.n]]);
  }

  /**
   * Run one query once; rows are not cached. One-off queries may also select columns,
   * aggregate (`COUNT(*)`, `SUM(col)` ... `GROUP BY`), `ORDER BY ... LIMIT n OFFSET m` and
   * `EXPLAIN` (docs/protocol.md, "The query language"): rows are keyed by result column name,
   * in the query's order. Rejects with a `QueryError`.
   */
  sql<Row extends object = Record<string, unknown>>(query: string): Promise<Row[]> {
    if (typeof query !== "string" || query === "") return Promise.reject(new TypeError("sql: query must be a non-empty string"));
    return new Promise<Row[]>((resolve, reject) => {
      this.request({
        build: (request_id) => ({ type: "query", request_id, sql: query }),
        resolve: (msg) => {
          if (msg.type !== "query_result") return;
          if (!msg.ok) {
            reject(new QueryError(msg.code ?? 0, msg.message ?? "query failed", query));
            return;
          }
          try {
            if (msg.table === null) {
              resolve([]);
              return;
            }
            const info = this.schema.table(msg.table);
            const columns = msg.columns;
            const whole = columns === null || (columns.length === info.columns.length && columns.every((c, i) => c === info.columns[i]));
            resolve(
              msg.rows.map(
                (r) => (whole ? info.row(r, this.codec.base64Bytes) : info.resultRow(columns, r, this.codec.base64Bytes)) as Row,
              ),
            );
          } catch (error) {
            reject(error);
          }
        },
        fail: reject,
        idempotencyKey: null,
        stillWanted: () => true,
      });
    });
  }

  /** Round trip through the server's message handling (`Ping`/`Pong`), in ms. Rejects when not connected. */
  ping(): Promise<number> {
    const ws = this.ws;
    if (ws === null || !this.helloSent || this.closed) {
      return Promise.reject(new ConnectionError("not connected"));
    }
    const nonce = this.nextNonce++;
    return new Promise<number>((resolve) => {
      this.pings.set(nonce, { sentAt: Date.now(), resolve });
      this.transmit({ type: "ping", nonce });
    });
  }

  /**
   * Send a fresh token on the live connection (`Reauth`), without dropping it. Without an
   * argument the token comes from `getToken`. The token must be for the same identity; if the
   * server refuses it, it closes with 4500.
   */
  async reauth(token?: string): Promise<void> {
    const fresh = token ?? (await this.fetchToken());
    if (fresh === null || fresh === "") throw new TypeError("reauth: no token (pass one, or give connect a getToken)");
    this.tokenValue = fresh;
    if (this.ws !== null && this.helloSent) this.transmit({ type: "reauth", token: fresh });
    this.scheduleRefresh();
  }

  /**
   * Close with 1000 and stop reconnecting. Requests still waiting reject with a
   * `ConnectionError`. The cache keeps its rows. Idempotent.
   */
  close(): Promise<void> {
    if (this.saveTimer !== null) clearTimeout(this.saveTimer);
    this.saveTimer = null;
    if (!this.closedByUser && this.terminal === null) this.saveNow();
    if (this.closedByUser || this.terminal !== null) {
      this.closedByUser = true;
      this.clearTimers();
      return Promise.resolve();
    }
    this.closedByUser = true;
    this.clearTimers();
    const ws = this.ws;
    if (ws === null) {
      this.finish(new ConnectionError("the client was closed", { closeCode: CloseCode.NORMAL }));
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      this.closedWaiters.push(resolve);
      try {
        ws.close(1000, "client closed");
      } catch {
        // Already closing.
      }
      // A socket that never answers the close handshake must not hold close() forever.
      setTimeout(() => {
        if (this.ws === ws) this.onSocketClosed(ws, 1000, "client closed");
      }, 1_000);
    });
  }

  // --- internals ---

  /** @internal Report an error that belongs to no promise (a throwing callback, say). */
  reportError(error: unknown): void {
    const e = error instanceof Error ? error : new Error(String(error));
    if (this.options.onError) {
      try {
        this.options.onError(e);
        return;
      } catch {
        // Fall through to the console: an onError that throws must not kill message handling.
      }
    }
    console.error("syncd:", e);
  }

  private resultRequest<T = unknown>(reducer: string, key: string | null, build: (requestId: number) => ClientMessage): Promise<CallResult<T>> {
    return new Promise<CallResult<T>>((resolve, reject) => {
      this.request({
        build,
        resolve: (msg) => {
          if (msg.type !== "result") return;
          if (msg.ok) {
            let value: unknown;
            try {
              value = this.schema.returnValue(reducer, msg.value, this.codec.base64Bytes);
            } catch (error) {
              reject(error);
              return;
            }
            // The value's type is the reducer's declared return type (the generated bindings name it).
            resolve({ offset: msg.offset, value: value as T });
          }
          else reject(reducerFailure(reducer, msg.code ?? 0, msg.message ?? "the call failed", key));
        },
        fail: reject,
        idempotencyKey: key,
        stillWanted: () => true,
      });
    });
  }

  private request(p: Pending): void {
    if (this.closed) {
      p.fail(this.closedError(p.idempotencyKey));
      return;
    }
    this.pending.add(p);
    if (this.ws !== null && this.helloSent) this.sendPending(p);
  }

  private sendPending(p: Pending): void {
    const requestId = this.nextRequestId++;
    let data: string | Uint8Array;
    try {
      data = this.codec.encode(p.build(requestId));
    } catch (error) {
      // A value that cannot go on the wire (a function, a bigint in JSON): the caller's error.
      this.pending.delete(p);
      p.fail(error instanceof Error ? error : new TypeError(String(error)));
      return;
    }
    this.byRequestId.set(requestId, p);
    this.sendData(data);
  }

  private transmit(message: ClientMessage): void {
    this.sendData(this.codec.encode(message));
  }

  private sendData(data: string | Uint8Array): void {
    const ws = this.ws;
    if (ws === null) return;
    try {
      ws.send(data);
    } catch {
      // The socket is closing: its close handler resends whatever is still pending.
    }
  }

  private closedError(idempotencyKey: string | null = null): ConnectionError {
    const t = this.terminal;
    if (t !== null) {
      return new ConnectionError(t.message, { closeCode: t.closeCode, reason: t.reason, code: t.code, idempotencyKey });
    }
    return new ConnectionError("the client was closed", { closeCode: CloseCode.NORMAL, idempotencyKey });
  }

  private async fetchToken(): Promise<string | null> {
    if (this.options.getToken === undefined) return this.tokenValue;
    const token = await this.options.getToken();
    if (token !== null && token !== undefined && token !== "") this.tokenValue = token;
    return this.tokenValue;
  }

  /** @internal Open the first socket; resolves on its Welcome. */
  /** The WebSocket URL attempts use now (one of the replicas given to `connect`). */
  get url(): string {
    return this.urls[this.urlIndex] ?? this.urls[0] ?? "";
  }

  /** @internal Work from the restored cache; connect (and resume) when the server answers. */
  startOffline(): void {
    void this.openSocket();
  }

  start(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.firstWelcome = { resolve, reject };
      void this.openSocket();
    });
  }

  private async openSocket(): Promise<void> {
    this.reconnectTimer = null;
    if (this.closed) return;
    let ws: WebSocketLike;
    try {
      const token = this.options.getToken ? await this.fetchToken() : this.tokenValue;
      if (this.closed) return;
      ws = new this.WebSocketImpl(this.url, [this.codec.subprotocol]) as WebSocketLike;
      if (this.firstWelcome !== null) this.firstTried += 1;
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      this.held = null;
      this.helloSent = false;
      this.socketEpoch = null;
      this.socketOffset = 0;
      this.lastServerError = null;
      this.byRequestId.clear();
      ws.onopen = () => this.onSocketOpen(ws, token);
      ws.onmessage = (ev) => this.onSocketMessage(ws, ev.data);
      ws.onclose = (ev) => this.onSocketClosed(ws, ev.code, ev.reason);
      ws.onerror = () => {
        // Always followed by a close event, which decides what happens.
      };
      const timeout = this.options.connectTimeoutMs ?? 10_000;
      this.welcomeTimer = setTimeout(() => {
        this.welcomeTimer = null;
        if (this.ws === ws && this.socketEpoch === null) {
          this.dropSocket(ws, CloseCode.ABNORMAL, `no Welcome within ${timeout} ms`);
        }
      }, timeout);
    } catch (error) {
      this.ws = null;
      const message = error instanceof Error ? error.message : String(error);
      this.afterClose(CloseCode.ABNORMAL, `could not open the connection: ${message}`);
    }
  }

  private onSocketOpen(ws: WebSocketLike, token: string | null): void {
    if (this.ws !== ws) return;
    if (ws.protocol !== "" && ws.protocol !== this.codec.subprotocol) {
      this.dropSocket(ws, CloseCode.PROTOCOL_ERROR, `the server chose subprotocol ${ws.protocol}`);
      return;
    }
    // Resume every set that holds rows (§8); unanswered subscribes go out again as Subscribe.
    const live = [...this.querySets.values()].filter((s) => s.status === "live");
    this.helloPending.clear();
    for (const s of live) this.helloPending.add(s.querySetId);
    const hello: ClientMessage = { type: "hello" };
    if (token !== null && token !== "") hello.token = token;
    if (this.cursorValue !== null && live.length > 0) hello.cursor = this.cursorValue;
    if (live.length > 0) hello.query_sets = live.map((s) => ({ query_set_id: s.querySetId, queries: s.queries }));
    this.transmit(hello);
    this.helloSent = true;
    for (const p of [...this.pending]) {
      if (!p.stillWanted()) {
        this.pending.delete(p);
        continue;
      }
      this.sendPending(p);
    }
  }

  private onSocketMessage(ws: WebSocketLike, data: unknown): void {
    if (this.ws !== ws) return;
    this.awaitingPong = false; // anything from the server shows the connection is alive
    let messages: ServerMessage[];
    try {
      messages = this.codec.decode(data);
    } catch (error) {
      this.reportError(error);
      return;
    }
    // Promise settlements run after the batch (they are microtasks), so a call's result is seen
    // after the callbacks of the transaction that came with it.
    if (this.held !== null) {
      this.heldBytes += byteSize(data);
      if (this.heldBytes > SyncdClient.heldBytesLimit) {
        this.held = null;
        const mib = Math.round(SyncdClient.heldBytesLimit / (1 << 20));
        this.dropSocket(ws, CloseCode.ABNORMAL, `over ${mib} MiB of messages arrived before the new schema was read from ${schemaUrl(this.url)}`);
        return;
      }
      this.held.push(...messages);
      return;
    }
    this.handleAll(messages);
  }

  private handleAll(messages: ServerMessage[]): void {
    this.saveSoon();
    this.cache.batch(() => {
      for (const msg of messages) {
        if (this.held !== null) {
          // A Welcome just started reading the new schema: the rest waits for it.
          this.held.push(msg);
          continue;
        }
        try {
          this.handle(msg);
        } catch (error) {
          this.reportError(error instanceof SyncdError ? error : new ProtocolViolation(String(error)));
        }
      }
    });
  }

  /**
   * The server migrated (Welcome's `schema_version` differs from the one the schema was read
   * at): read `GET /v1/schema` again before handling any row, since rows come in the new layout.
   * A failure drops the socket (resumable), so the next Welcome tries again.
   */
  private async refreshSchema(ws: WebSocketLike, version: number): Promise<void> {
    const fetchImpl = this.options.fetch ?? (globalThis as { fetch?: ConnectOptions["fetch"] }).fetch;
    const url = schemaUrl(this.url);
    let json: SchemaJson;
    const timeout = this.options.connectTimeoutMs ?? 10_000;
    const timer = setTimeout(() => {
      if (this.ws === ws && this.held !== null) {
        this.held = null;
        this.dropSocket(ws, CloseCode.ABNORMAL, `no schema from ${url} within ${timeout} ms`);
      }
    }, timeout);
    try {
      if (fetchImpl === undefined) throw new TypeError("no fetch (pass connect({ fetch }))");
      const response = await fetchImpl(url);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      json = (await response.json()) as SchemaJson;
      if (this.ws !== ws) return;
      const described = (json as { schema_version?: unknown } | null)?.schema_version;
      if (typeof described === "number" && described !== version) {
        // Another replica, not migrated yet (or migrated further): its columns are not those of
        // this socket's rows. Drop the socket; the next Welcome reads again.
        this.held = null;
        this.dropSocket(ws, CloseCode.ABNORMAL, `${url} describes schema version ${described}, the WebSocket serves version ${version}`);
        return;
      }
      const schema = new ClientSchema(json);
      this.schema = schema;
      this.cache.setSchema(schema);
    } catch (error) {
      if (this.ws !== ws) return;
      const message = error instanceof Error ? error.message : String(error);
      if (this.schemaFetched) {
        this.held = null;
        this.dropSocket(ws, CloseCode.ABNORMAL, `could not read the new schema from ${url}: ${message}`);
        return;
      }
      // It never was readable (given by the app, or cross-origin): go on with the old one.
      this.reportError(new ProtocolViolation(`the server's schema changed to version ${version} and ${url} cannot be read (${message}); rows may not decode`));
      this.schemaReadAt = version;
      const held = this.held ?? [];
      this.held = null;
      this.handleAll(held);
      return;
    } finally {
      clearTimeout(timer);
    }
    this.schemaReadAt = typeof json.schema_version === "number" ? json.schema_version : version;
    this.checkBindings(json, false);
    const held = this.held ?? [];
    this.held = null;
    this.handleAll(held);
  }

  /** Compare `connect({ bindings })` with the server's schema (a no-op without bindings). */
  private checkBindings(server: SchemaJson, atConnect: boolean): void {
    const bindings = this.options.bindings;
    if (bindings === undefined) return;
    const differences = staleDifferences(bindings, server);
    const version = typeof server.schema_version === "number" ? server.schema_version : this.schemaVersionValue;
    this.staleBindingsValue = differences.length > 0 ? new StaleBindingsError(differences, version) : null;
    if (this.staleBindingsValue !== null && !atConnect) this.reportError(this.staleBindingsValue);
  }

  private handle(msg: ServerMessage): void {
    switch (msg.type) {
      case "welcome":
        return this.onWelcome(msg);
      case "applied": {
        this.socketOffset = Math.max(this.socketOffset, msg.offset);
        const set = this.querySets.get(msg.query_set_id);
        this.settle(msg.request_id, msg);
        if (msg.request_id === null) this.helloPending.delete(msg.query_set_id);
        if (set !== undefined && (set.status === "pending" || set.status === "live")) {
          if (msg.resumed) {
            msg.queries.forEach((q, i) => this.cache.applyUpdate(set.querySetId, i, q, this.codec.base64Bytes));
          } else {
            msg.queries.forEach((q, i) => this.cache.replace(set.querySetId, i, q, this.codec.base64Bytes));
            this.cache.trimSet(set.querySetId, msg.queries.length);
          }
          set.status = "live";
          set.lastResumed = msg.resumed;
          set.markApplied();
        }
        this.advanceCursor(null);
        return;
      }
      case "sub_failed": {
        const set = this.querySets.get(msg.query_set_id);
        const error = new SubscriptionError(msg.code, msg.message, set?.queries ?? []);
        if (msg.request_id !== null) {
          // Answers our Subscribe: that set was never subscribed.
          const p = this.byRequestId.get(msg.request_id);
          this.byRequestId.delete(msg.request_id);
          if (p !== undefined) {
            this.pending.delete(p);
            p.fail(error);
          }
          return;
        }
        this.helloPending.delete(msg.query_set_id);
        if (set !== undefined && set.status !== "unsubscribed") this.failSet(set, error);
        else this.cache.dropSet(msg.query_set_id);
        this.advanceCursor(null);
        return;
      }
      case "unsubbed":
        this.settle(msg.request_id, msg);
        this.cache.dropSet(msg.query_set_id);
        return;
      case "tx": {
        this.socketOffset = Math.max(this.socketOffset, msg.offset);
        for (const u of msg.updates) {
          const set = this.querySets.get(u.query_set_id);
          // Ignore sets we do not hold (e.g. just unsubscribed) (§7).
          if (set === undefined || set.status !== "live") continue;
          this.cache.applyUpdate(u.query_set_id, u.query_index, u.delta, this.codec.base64Bytes);
        }
        this.advanceCursor(msg.epoch);
        return;
      }
      case "result":
      case "query_result":
        this.settle(msg.request_id, msg);
        return;
      case "error":
        this.lastServerError = { code: msg.code, message: msg.message };
        if (msg.request_id !== null) {
          // The request that broke the connection is not sent again.
          const p = this.byRequestId.get(msg.request_id);
          this.byRequestId.delete(msg.request_id);
          if (p !== undefined) {
            this.pending.delete(p);
            p.fail(new ConnectionError(msg.message, { code: msg.code, idempotencyKey: p.idempotencyKey }));
          }
        }
        return;
      case "pong": {
        this.awaitingPong = false;
        const ping = this.pings.get(msg.nonce);
        if (ping !== undefined) {
          this.pings.delete(msg.nonce);
          ping.resolve(Date.now() - ping.sentAt);
        }
        return;
      }
    }
  }

  private settle(requestId: number | null, msg: ServerMessage): void {
    if (requestId === null) return;
    const p = this.byRequestId.get(requestId);
    if (p === undefined) return;
    this.byRequestId.delete(requestId);
    this.pending.delete(p);
    p.resolve(msg);
  }

  private failSet(set: QuerySetState, error: SyncdError): void {
    this.cache.dropSet(set.querySetId);
    const heard = set.markFailed(error);
    if (!heard) this.reportError(error);
  }

  /** Move the cursor to the socket's latest offset, unless Hello's sets are still unanswered (§8). */
  private advanceCursor(epoch: number | null): void {
    if (epoch !== null) this.socketEpoch = epoch;
    if (this.helloPending.size > 0 || this.socketEpoch === null) return;
    this.cursorValue = { epoch: this.socketEpoch, offset: this.socketOffset };
  }

  private onWelcome(msg: Extract<ServerMessage, { type: "welcome" }>): void {
    this.identityValue = msg.identity;
    this.connectionIdValue = msg.connection_id;
    if (msg.schema_version !== null) {
      const known = this.schemaReadAt ?? this.schemaVersionValue;
      this.schemaVersionValue = msg.schema_version;
      if (this.schemaReadAt === null && known === null) this.schemaReadAt = msg.schema_version;
      if (known !== null && known !== msg.schema_version && this.ws !== null) {
        this.held = [];
        this.heldBytes = 0;
        void this.refreshSchema(this.ws, msg.schema_version);
      }
    }
    if (msg.token !== null) this.tokenValue = msg.token;
    this.socketEpoch = msg.epoch;
    this.socketOffset = Math.max(this.socketOffset, msg.offset);
    this.retriedAuth = false;
    if (this.welcomeTimer !== null) clearTimeout(this.welcomeTimer);
    this.welcomeTimer = null;
    this.startHeartbeat();
    if (this.helloPending.size === 0) this.cursorValue = { epoch: msg.epoch, offset: msg.offset };
    // The delays start over only once a connection stayed up for a while.
    if (this.stableTimer !== null) clearTimeout(this.stableTimer);
    this.stableTimer = setTimeout(() => {
      this.stableTimer = null;
      this.backoff.reset();
    }, this.stableMs);
    this.scheduleRefresh();
    const reconnected = this.everConnected;
    this.everConnected = true;
    const info: ConnectInfo = { identity: msg.identity, connectionId: msg.connection_id, token: this.tokenValue, reconnected };
    for (const cb of [...this.connectListeners]) {
      try {
        cb(info);
      } catch (error) {
        this.reportError(error);
      }
    }
    const first = this.firstWelcome;
    this.firstWelcome = null;
    first?.resolve();
  }

  /** Refresh a JWT before its `exp`, on the live connection (`Reauth`). Needs `getToken`. */
  private scheduleRefresh(): void {
    if (this.refreshTimer !== null) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    if (this.options.getToken === undefined || this.closed) return;
    const exp = jwtExpiryMs(this.tokenValue);
    if (exp === null) return;
    const delay = Math.min(refreshDelayMs(exp, Date.now(), this.lastRefreshAt), MAX_TIMER_MS);
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      this.lastRefreshAt = Date.now();
      const before = this.tokenValue;
      this.fetchToken().then(
        (token) => {
          if (this.closed) return;
          if (token !== null && token !== before && this.ws !== null && this.helloSent) {
            this.transmit({ type: "reauth", token });
          }
          // A token that did not change is not refreshed again in a loop: the server's 4002 will.
          if (token !== before) this.scheduleRefresh();
        },
        (error: unknown) => this.reportError(error),
      );
    }, delay);
  }

  /** Forget a socket that is no longer wanted, and handle it as closed with `code` now. */
  private dropSocket(ws: WebSocketLike, code: number, reason: string): void {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code === CloseCode.ABNORMAL ? 1000 : code, reason.slice(0, 100));
    } catch {
      // Not open yet, or already closed.
    }
    this.onSocketClosed(ws, code, reason);
  }

  private onSocketClosed(ws: WebSocketLike, code: number, reason: string): void {
    if (this.ws !== ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this.ws = null;
    this.held = null;
    this.helloSent = false;
    const welcomed = this.socketEpoch !== null;
    this.socketEpoch = null;
    this.helloPending.clear();
    this.byRequestId.clear();
    for (const ping of this.pings.values()) ping.resolve(Number.NaN);
    this.pings.clear();
    this.clearSocketTimers();
    this.afterClose(code, reason, welcomed);
  }

  private afterClose(code: number, reason: string, welcomed = false): void {
    const serverError = this.lastServerError;
    const why = serverError !== null ? serverError.message : reason || `closed with ${code}`;
    if (this.closedByUser) {
      this.finish(new ConnectionError("the client was closed", { closeCode: code, reason }));
      return;
    }
    // An attempt that never got its Welcome moves on to the next replica's URL, and so does a
    // connection closed with SCHEMA_CHANGED (that replica serves no client now).
    const moveOn = !welcomed || code === CloseCode.SCHEMA_CHANGED;
    if (moveOn && this.urls.length > 1) this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    let again = false;
    if (this.firstWelcome !== null) {
      // The first connection failed: try the other replicas, then connect() rejects.
      if (isResumableClose(code) && this.firstTried < this.urls.length) {
        this.reconnectTimer = setTimeout(() => void this.openSocket(), 0);
        return;
      }
      again = false;
    } else if (!this.reconnectEnabled) {
      again = false;
    } else if (code === CloseCode.REAUTHENTICATE) {
      // openSocket asks getToken for a fresh token first. Without getToken the only token is the
      // one that expired (still inside the server's clock-skew leeway, it would be accepted and
      // expire again at once): stop, so the application can sign in again.
      again = this.options.getToken !== undefined;
    } else if (code === CloseCode.UNAUTHORIZED) {
      // Only a fresh token can help; try it once.
      again = this.options.getToken !== undefined && !this.retriedAuth;
      this.retriedAuth = again;
    } else {
      again = isResumableClose(code);
    }
    const info: DisconnectInfo = { code, reason: why, willReconnect: again };
    if (this.everConnected) {
      for (const cb of [...this.disconnectListeners]) {
        try {
          cb(info);
        } catch (error) {
          this.reportError(error);
        }
      }
    }
    if (!again) {
      this.finish(
        new ConnectionError(`connection closed (${code}): ${why}`, { closeCode: code, reason: why, code: serverError?.code ?? null }),
      );
      return;
    }
    const delay = this.backoff.next();
    this.reconnectTimer = setTimeout(() => void this.openSocket(), delay);
  }

  /** Stop for good: fail everything that waits. */
  private finish(error: ConnectionError): void {
    if (!this.closedByUser) this.terminal = error;
    this.clearTimers();
    const first = this.firstWelcome;
    this.firstWelcome = null;
    first?.reject(error);
    const waiting = [...this.pending];
    this.pending.clear();
    this.byRequestId.clear();
    for (const p of waiting) {
      p.fail(new ConnectionError(error.message, { closeCode: error.closeCode, reason: error.reason, code: error.code, idempotencyKey: p.idempotencyKey }));
    }
    for (const resolve of this.closedWaiters.splice(0)) resolve();
  }

  /** Timers that belong to one socket. */
  private clearSocketTimers(): void {
    for (const t of [this.reconnectTimer, this.stableTimer, this.refreshTimer, this.welcomeTimer]) if (t !== null) clearTimeout(t);
    if (this.heartbeatTimer !== null) clearInterval(this.heartbeatTimer);
    this.reconnectTimer = this.stableTimer = this.refreshTimer = this.welcomeTimer = this.heartbeatTimer = null;
    this.awaitingPong = false;
  }

  private clearTimers(): void {
    this.clearSocketTimers();
  }

  /**
   * A connection that died without a close frame (a laptop lid, a NAT timeout) is noticed only
   * when something is sent: every `pingIntervalMs` send a Ping, and if the previous one is still
   * unanswered, drop the socket and resume elsewhere (handled like 1006).
   */
  private startHeartbeat(): void {
    const interval = this.options.pingIntervalMs ?? 30_000;
    if (this.heartbeatTimer !== null) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    this.awaitingPong = false;
    if (!(interval > 0)) return;
    const ws = this.ws;
    this.heartbeatTimer = setInterval(() => {
      if (this.ws !== ws || ws === null) return;
      if (this.awaitingPong) {
        this.dropSocket(ws, CloseCode.ABNORMAL, `no Pong within ${interval} ms`);
        return;
      }
      this.awaitingPong = true;
      this.transmit({ type: "ping", nonce: this.nextNonce++ });
    }, interval);
  }
}

function randomId(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string; getRandomValues?: (a: Uint8Array) => Uint8Array } }).crypto;
  if (c?.randomUUID) return c.randomUUID().replace(/-/g, "");
  const bytes = new Uint8Array(16);
  if (c?.getRandomValues) c.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  let hex = "";
  for (const b of bytes) hex += (b < 16 ? "0" : "") + b.toString(16);
  return hex;
}

/**
 * Connect to a syncd server. Resolves after the first `Welcome`, with `identity` and `token`
 * set; rejects with a `ConnectionError` if that first connection fails (bad token: 4500,
 * refused by `client_connected`: 4502, unreachable server: 1006). After that the client
 * reconnects by itself (unless `reconnect: false`).
 */
export async function connect(options: ConnectOptions): Promise<SyncdClient> {
  const saved = options.store !== undefined ? await options.store.load() : null;
  let schema = options.schema;
  let fetched = false;
  let offline = false;
  const fetchImpl = options.fetch ?? (globalThis as { fetch?: ConnectOptions["fetch"] }).fetch;
  if (schema === undefined && options.bindings !== undefined && fetchImpl === undefined) schema = options.bindings;
  if (schema === undefined) {
    if (fetchImpl === undefined) throw new TypeError("no fetch to read the schema with: pass connect({ schema }) or connect({ fetch })");
    // From the first replica that answers.
    const urls = Array.isArray(options.url) ? options.url : [options.url];
    let failure: ConnectionError | null = null;
    for (const given of urls) {
      const url = schemaUrl(given);
      try {
        const response = await fetchImpl(url);
        if (!response.ok) {
          failure = new ConnectionError(`could not read the schema from ${url}: HTTP ${response.status}`);
          continue;
        }
        schema = (await response.json()) as SchemaJson;
        fetched = true;
        break;
      } catch (error) {
        failure = new ConnectionError(`could not read the schema from ${url}: ${error instanceof Error ? error.message : String(error)}`);
      }
    }
    // Unreadable (a page on another origin, without CORS): the bindings are the schema, unchecked,
    // and a server that is down fails the WebSocket attempt below just the same.
    if (schema === undefined && saved?.state) {
      // The server is unreachable, but this store holds a schema: work from the saved cache.
      schema = saved.state.schema;
      offline = true;
    }
    if (schema === undefined && options.bindings !== undefined) schema = options.bindings;
    if (schema === undefined) throw failure ?? new ConnectionError("no URL to read the schema from");
  }
  if (options.bindings !== undefined && fetched) {
    const differences = staleDifferences(options.bindings, schema);
    if (differences.length > 0) {
      throw new StaleBindingsError(differences, typeof schema.schema_version === "number" ? schema.schema_version : null);
    }
  }
  const client = new SyncdClient(options, schema, fetched);
  if (saved !== null) {
    const same = saved.state !== null && JSON.stringify(saved.state.schema) === JSON.stringify(schema);
    client.restoreFrom(saved.state, saved.writes, same);
  }
  if (offline) client.startOffline();
  else await client.start();
  return client;
}

export type { TableState };

/** The size of a WebSocket frame's data in bytes (text: its UTF-16 length, close enough). */
function byteSize(data: unknown): number {
  if (typeof data === "string") return data.length;
  if (data instanceof ArrayBuffer) return data.byteLength;
  if (ArrayBuffer.isView(data)) return data.byteLength;
  return 0;
}
