/** The public shapes of the client API. */
import type { ClientStore } from "./store.js";
import type { SchemaJson } from "./schema.js";
import type { SyncdError } from "./errors.js";

/** The part of the WebSocket API the client uses: the browser's, React Native's, or the `ws` package's. */
export interface WebSocketLike {
  readonly protocol: string;
  readonly readyState: number;
  binaryType: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean?: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string | Uint8Array | ArrayBuffer): void;
  close(code?: number, reason?: string): void;
}

/**
 * A WebSocket constructor: `globalThis.WebSocket`, or `ws`'s `WebSocket` in Node 20. Its
 * instances must behave as `WebSocketLike` describes; the type asks only for the constructor's
 * shape, so implementations whose event types are more specific (like `ws`) fit without a cast.
 */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => object;

/** `"msgpack"` (the default: binary frames, `syncd.v1.msgpack`) or `"json"` (`syncd.v1.json`). */
export type WireFormat = "msgpack" | "json";

/** Reconnect policy; `false` turns reconnecting off. */
export interface ReconnectOptions {
  /** Ceiling of the first delay, in ms (default 500). */
  baseMs?: number;
  /** Largest delay, in ms (default 30,000). */
  capMs?: number;
  /** Growth of the ceiling per failed attempt (default 2). */
  factor?: number;
  /** A connection that stayed up this long resets the delays (default 5,000 ms). */
  stableMs?: number;
}

/** Why the client went down: the WebSocket close code and reason, and whether it will reconnect. */
export interface DisconnectInfo {
  code: number;
  reason: string;
  /** True when the client reconnects by itself; false when the connection ended for good. */
  willReconnect: boolean;
}

/** What `Welcome` told the client. */
export interface ConnectInfo {
  identity: string;
  connectionId: string;
  token: string | null;
  /** Whether this is a reconnect (the cache was kept and resumed). */
  reconnected: boolean;
}

export interface ConnectOptions {
  /**
   * `ws[s]://host:port/v1/ws`; `ws://host:port` and `http(s)://host:port` are accepted too. Or
   * one URL per replica of a cluster: the first that answers is used, and an attempt that fails
   * moves on to the next (the client resumes on any replica). Behind a load balancer, one URL.
   */
  url: string | string[];
  /** A bearer token: a Supabase JWT, an API key (`sk_...`) or an anonymous token minted earlier. */
  token?: string | null;
  /**
   * Returns a fresh token (e.g. your auth library's session refresh). Asked before every
   * connection, before a JWT's `exp` (then sent as `Reauth` on the live connection), and when the
   * server closes with 4002 REAUTHENTICATE.
   */
  getToken?: () => string | null | Promise<string | null>;
  /** The `GET /v1/schema` document; fetched from the server when omitted. */
  schema?: SchemaJson;
  /**
   * The schema generated bindings were made from (their `schema` const; `connectTyped` passes
   * it). The client then reads the server's schema itself (rows are decoded with it, so a column
   * added by a migration just appears) and compares: when the bindings are older in a way that
   * matters, `connect` rejects with a `StaleBindingsError`, or, after a later migration, it goes to
   * `onError` and `client.staleBindings`.
   */
  bindings?: SchemaJson;
  onConnect?: (info: ConnectInfo) => void;
  onDisconnect?: (info: DisconnectInfo) => void;
  /** Errors that belong to nobody's promise: a callback that threw, a subscription that failed later, a refused token refresh. */
  onError?: (error: SyncdError | Error) => void;
  /** The WebSocket constructor; defaults to `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Wire encoding; default `"msgpack"`. */
  format?: WireFormat;
  /** Reconnect policy, or `false` to stop at the first drop. Default: on. */
  reconnect?: boolean | ReconnectOptions;
  /** `fetch` for the schema; defaults to `globalThis.fetch`. */
  fetch?: (url: string) => Promise<{ ok: boolean; status: number; json(): Promise<unknown> }>;
  /** How long a connection attempt waits for `Welcome` before giving up, in ms (default 10,000). */
  connectTimeoutMs?: number;
  /**
   * Send a `Ping` this often (ms) and treat the connection as lost (1006: reconnect and resume)
   * when the previous one got no answer; 0 turns it off. Default 30,000.
   */
  pingIntervalMs?: number;
  /**
   * Keep the row cache, query sets, cursor, token and unanswered calls and merges here
   * (`indexedDbStore()` in browsers, `memoryStore()` or your own in Node). With it, `connect`
   * while the server is unreachable resolves with a client that works from the saved cache and
   * connects when it can, and writes left unanswered are sent again (`client.restored`).
   */
  store?: ClientStore;
}

export interface TableCache<Row> {
  /** Every cached row. */
  rows(): Row[];
  count(): number;
  /** The row whose `column` (the primary key or a unique column) equals `value`. */
  find(column: string, value: unknown): Row | undefined;
  /** The rows whose `column` (an indexed column: primary key, unique or indexed) equals `value`. */
  filter(column: string, value: unknown): Row[];
  onInsert(cb: (row: Row) => void): () => void;
  onUpdate(cb: (oldRow: Row, newRow: Row) => void): () => void;
  onDelete(cb: (row: Row) => void): () => void;
}

export interface SubscriptionHandle {
  /** Resolves once the initial rows are in the cache; rejects with a `SubscriptionError`. */
  readonly applied: Promise<void>;
  /** Whether the last `SubscribeApplied` for this set was a resume (`resumed` true). */
  readonly lastResumed: boolean;
  /** Called when the set fails: at subscribe time, or later (e.g. dropped on resume). Returns an unsubscribe function. */
  onError(cb: (error: SyncdError) => void): () => void;
  /** Stop the set and release its rows (rows another set still matches stay). Idempotent. */
  unsubscribe(): Promise<void>;
}

export interface CallOptions {
  /** Reuse a key to make a retried call apply once; a fresh key is made when omitted. */
  idempotencyKey?: string;
}

export interface CallResult<T = unknown> {
  /** The transaction's offset; null when the call changed nothing. */
  offset: number | null;
  /**
   * What the reducer returned, of its declared return type (`returns` in the schema; bytes
   * decoded from base64 over JSON); null when it declares none (and for merges).
   */
  value: T;
}
