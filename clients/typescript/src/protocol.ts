/**
 * The wire messages of docs/protocol.md and the two codecs (`syncd.v1.msgpack`, `syncd.v1.json`).
 *
 * Both formats carry the same maps. Differences the codec hides: MessagePack frames are binary and
 * carry bytes as `bin`; JSON frames are text and carry bytes as base64 strings, which the encoder
 * writes for every `Uint8Array` it meets (the server decodes them by parameter or column type) and
 * the cache decodes by column type on the way in (see `TableInfo.row`).
 */
import { Decoder, Encoder } from "@msgpack/msgpack";
import { base64Encode } from "./base64.js";
import { ProtocolViolation } from "./errors.js";
import type { WireFormat } from "./types.js";

export const SUBPROTOCOLS: Record<WireFormat, string> = {
  msgpack: "syncd.v1.msgpack",
  json: "syncd.v1.json",
};

export interface Cursor {
  epoch: number;
  offset: number;
}

export interface QuerySet {
  query_set_id: number;
  queries: string[];
}

// Client -> server (§4).
export type ClientMessage =
  | { type: "hello"; token?: string | null; cursor?: Cursor | null; query_sets?: QuerySet[] }
  | { type: "sub"; request_id: number; query_set_id: number; queries: string[] }
  | { type: "unsub"; request_id: number; query_set_id: number }
  | { type: "call"; request_id: number; reducer: string; args?: unknown[]; idempotency_key?: string | null }
  | { type: "merge"; request_id: number; table: string; pk: unknown; column: string; op: unknown }
  | { type: "query"; request_id: number; sql: string }
  | { type: "reauth"; token: string }
  | { type: "ping"; nonce: number };

/** The rows of one query (§5.2), with optional fields filled with their defaults. */
export interface QueryUpdate {
  table: string;
  inserts: unknown[][];
  updates: unknown[][];
  deletes: unknown[];
}

export interface QuerySetUpdate {
  query_set_id: number;
  query_index: number;
  delta: QueryUpdate;
}

// Server -> client (§5), after `normalize`: optional fields hold their defaults.
export type ServerMessage =
  | { type: "welcome"; identity: string; connection_id: string; epoch: number; offset: number; token: string | null; schema_version: number | null }
  | { type: "applied"; request_id: number | null; query_set_id: number; offset: number; queries: QueryUpdate[]; resumed: boolean }
  | { type: "sub_failed"; request_id: number | null; query_set_id: number; code: number; message: string }
  | { type: "unsubbed"; request_id: number; query_set_id: number }
  | { type: "tx"; epoch: number; offset: number; updates: QuerySetUpdate[] }
  | { type: "result"; request_id: number; ok: boolean; offset: number | null; code: number | null; message: string | null; value: unknown }
  | { type: "query_result"; request_id: number; ok: boolean; table: string | null; rows: unknown[][]; offset: number | null; code: number | null; message: string | null; columns: string[] | null }
  | { type: "error"; code: number; message: string; request_id: number | null }
  | { type: "pong"; nonce: number };

/** Encodes client messages and decodes server messages for one wire format. */
export interface Codec {
  readonly format: WireFormat;
  readonly subprotocol: string;
  /** Whether bytes values arrive as base64 text (JSON). */
  readonly base64Bytes: boolean;
  encode(message: ClientMessage): string | Uint8Array;
  /** One WebSocket message -> its protocol messages (a `Batch` is flattened, in order). */
  decode(data: unknown): ServerMessage[];
}

export function makeCodec(format: WireFormat): Codec {
  if (format === "msgpack") return new MsgpackCodec();
  if (format === "json") return new JsonCodec();
  throw new TypeError(`format must be "msgpack" or "json", got ${JSON.stringify(format)}`);
}

class MsgpackCodec implements Codec {
  readonly format = "msgpack" as const;
  readonly subprotocol = SUBPROTOCOLS.msgpack;
  readonly base64Bytes = false;
  // `useBigInt64` on the encoder lets callers pass bigint arguments; `ignoreUndefined` drops
  // absent optional fields. The decoder keeps JS numbers (see README "Types").
  private readonly encoder = new Encoder({ useBigInt64: true, ignoreUndefined: true });
  private readonly decoder = new Decoder();

  encode(message: ClientMessage): Uint8Array {
    return this.encoder.encode(widenInts(message));
  }

  decode(data: unknown): ServerMessage[] {
    let value: unknown;
    if (typeof data === "string") throw new ProtocolViolation("a text frame on the msgpack subprotocol");
    try {
      value = this.decoder.decode(toBytes(data));
    } catch (error) {
      throw new ProtocolViolation(`undecodable MessagePack frame: ${String(error)}`);
    }
    return flatten(value);
  }
}

class JsonCodec implements Codec {
  readonly format = "json" as const;
  readonly subprotocol = SUBPROTOCOLS.json;
  readonly base64Bytes = true;

  encode(message: ClientMessage): string {
    return JSON.stringify(message, jsonReplacer);
  }

  decode(data: unknown): ServerMessage[] {
    const text = typeof data === "string" ? data : utf8Decode(toBytes(data));
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (error) {
      throw new ProtocolViolation(`undecodable JSON frame: ${String(error)}`);
    }
    return flatten(value);
  }
}

/**
 * With `useBigInt64`, @msgpack/msgpack writes an integer number beyond 32 bits as a float64, which
 * the server refuses where it wants an int (a millisecond timestamp, a large id). Such numbers go
 * to the encoder as bigint instead, which it writes as int64/uint64.
 */
function widenInts(value: unknown): unknown {
  if (typeof value === "number") {
    return Number.isSafeInteger(value) && (value > 0xffffffff || value < -0x80000000) ? BigInt(value) : value;
  }
  if (value === null || typeof value !== "object" || ArrayBuffer.isView(value)) return value;
  if (Array.isArray(value)) return value.map(widenInts);
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) out[k] = widenInts(v);
  return out;
}

// JSON.stringify calls `toJSON` first, so Uint8Array arrives here as itself (it has no toJSON).
function jsonReplacer(_key: string, value: unknown): unknown {
  if (value instanceof Uint8Array) return base64Encode(value);
  if (typeof value === "bigint") {
    if (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw new RangeError(`${value} does not fit a JSON number exactly; use format "msgpack" for it`);
    }
    return Number(value);
  }
  return value;
}

function toBytes(data: unknown): Uint8Array {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (Array.isArray(data)) {
    // `ws` with binaryType "fragments" hands over a list of Buffers.
    const parts = data.map(toBytes);
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
  throw new ProtocolViolation(`unexpected WebSocket message data: ${Object.prototype.toString.call(data)}`);
}

function utf8Decode(bytes: Uint8Array): string {
  if (typeof TextDecoder !== "undefined") return new TextDecoder().decode(bytes);
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return decodeURIComponent(escape(s));
}

function flatten(value: unknown): ServerMessage[] {
  const msg = asMap(value, "message");
  if (msg.type === "batch") {
    if (!Array.isArray(msg.messages)) throw new ProtocolViolation("batch: messages is not an array");
    return msg.messages.map((m) => {
      const inner = asMap(m, "batch item");
      if (inner.type === "batch") throw new ProtocolViolation("nested batch");
      return normalize(inner);
    });
  }
  return [normalize(msg)];
}

function asMap(value: unknown, what: string): Record<string, unknown> {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new ProtocolViolation(`${what} is not a map`);
  }
  return value as Record<string, unknown>;
}

function int(m: Record<string, unknown>, field: string): number {
  const v = m[field];
  if (typeof v !== "number" || !Number.isInteger(v)) {
    throw new ProtocolViolation(`${String(m.type)}: ${field} is not an integer`);
  }
  return v;
}

function intOrNull(m: Record<string, unknown>, field: string): number | null {
  return m[field] === undefined || m[field] === null ? null : int(m, field);
}

function str(m: Record<string, unknown>, field: string): string {
  const v = m[field];
  if (typeof v !== "string") throw new ProtocolViolation(`${String(m.type)}: ${field} is not a string`);
  return v;
}

function strOrNull(m: Record<string, unknown>, field: string): string | null {
  return m[field] === undefined || m[field] === null ? null : str(m, field);
}

function strListOrNull(m: Record<string, unknown>, field: string): string[] | null {
  if (m[field] === undefined || m[field] === null) return null;
  const v = list(m, field);
  for (const item of v) {
    if (typeof item !== "string") throw new ProtocolViolation(`${String(m.type)}: ${field} holds a non-string`);
  }
  return v as string[];
}

function list(m: Record<string, unknown>, field: string): unknown[] {
  const v = m[field];
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v)) throw new ProtocolViolation(`${String(m.type)}: ${field} is not an array`);
  return v;
}

function rows(m: Record<string, unknown>, field: string): unknown[][] {
  const v = list(m, field);
  for (const row of v) {
    if (!Array.isArray(row)) throw new ProtocolViolation(`${String(m.type)}: a row in ${field} is not an array`);
  }
  return v as unknown[][];
}

function queryUpdate(value: unknown): QueryUpdate {
  const m = asMap(value, "query update");
  return { table: str(m, "table"), inserts: rows(m, "inserts"), updates: rows(m, "updates"), deletes: list(m, "deletes") };
}

/** Check a decoded server message's required fields and fill in its optional ones (§2.1). */
export function normalize(m: Record<string, unknown>): ServerMessage {
  switch (m.type) {
    case "welcome":
      return {
        type: "welcome",
        identity: str(m, "identity"),
        connection_id: str(m, "connection_id"),
        epoch: int(m, "epoch"),
        offset: int(m, "offset"),
        token: strOrNull(m, "token"),
        schema_version: intOrNull(m, "schema_version"),
      };
    case "applied":
      return {
        type: "applied",
        request_id: intOrNull(m, "request_id"),
        query_set_id: int(m, "query_set_id"),
        offset: int(m, "offset"),
        queries: list(m, "queries").map(queryUpdate),
        resumed: m.resumed === true,
      };
    case "sub_failed":
      return {
        type: "sub_failed",
        request_id: intOrNull(m, "request_id"),
        query_set_id: int(m, "query_set_id"),
        code: int(m, "code"),
        message: str(m, "message"),
      };
    case "unsubbed":
      return { type: "unsubbed", request_id: int(m, "request_id"), query_set_id: int(m, "query_set_id") };
    case "tx":
      return {
        type: "tx",
        epoch: int(m, "epoch"),
        offset: int(m, "offset"),
        updates: list(m, "updates").map((u) => {
          const qs = asMap(u, "query set update");
          return { query_set_id: int(qs, "query_set_id"), query_index: int(qs, "query_index"), delta: queryUpdate(qs.delta) };
        }),
      };
    case "result":
      return {
        type: "result",
        request_id: int(m, "request_id"),
        ok: m.ok === true,
        offset: intOrNull(m, "offset"),
        code: intOrNull(m, "code"),
        message: strOrNull(m, "message"),
        // Any value; typed by the reducer's declared return type (absent: null).
        value: m.value === undefined ? null : m.value,
      };
    case "query_result":
      return {
        type: "query_result",
        request_id: int(m, "request_id"),
        ok: m.ok === true,
        table: strOrNull(m, "table"),
        rows: rows(m, "rows"),
        offset: intOrNull(m, "offset"),
        code: intOrNull(m, "code"),
        message: strOrNull(m, "message"),
        columns: strListOrNull(m, "columns"),
      };
    case "error":
      return { type: "error", code: int(m, "code"), message: str(m, "message"), request_id: intOrNull(m, "request_id") };
    case "pong":
      return { type: "pong", nonce: int(m, "nonce") };
    default:
      throw new ProtocolViolation(`unknown server message type ${JSON.stringify(m.type)}`);
  }
}
