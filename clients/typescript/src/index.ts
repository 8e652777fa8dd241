/**
 * `@syncd/client`: the TypeScript client for syncd (docs/protocol.md, version 1).
 *
 * ```ts
 * const client = await connect({ url: "ws://127.0.0.1:3000/v1/ws" });
 * client.table<{ id: number; text: string }>("message").onInsert((m) => console.log(m.text));
 * await client.subscribe(["SELECT * FROM message"]).applied;
 * await client.call("send_message", ["hello"]);
 * ```
 */
export { connect, SyncdClient, isResumableClose } from "./connection.js";
export {
  SyncdError,
  ReducerError,
  InternalError,
  ConnectionError,
  SubscriptionError,
  QueryError,
  ProtocolViolation,
  StaleBindingsError,
  ErrorCode,
  CloseCode,
  errorCodeName,
  isRetryable,
} from "./errors.js";
export type {
  SchemaJson,
  TableSchema,
  ReducerSchema,
  ColumnSchema,
  ColumnType,
  IndexSchema,
  ParamSchema,
} from "./schema.js";
export { schemaUrl, staleDifferences, wsUrl } from "./schema.js";
export type {
  ConnectOptions,
  ConnectInfo,
  DisconnectInfo,
  ReconnectOptions,
  TableCache,
  SubscriptionHandle,
  CallOptions,
  CallResult,
  WebSocketLike,
  WebSocketConstructor,
  WireFormat,
} from "./types.js";
export type { Cursor } from "./protocol.js";
export { Backoff } from "./backoff.js";
export { indexedDbStore, memoryStore } from "./store.js";
export type { ClientStore, SavedQuerySet, SavedState, SavedWrite } from "./store.js";
export type { BackoffOptions } from "./backoff.js";
