/** Shared test fixtures: a schema like schema/chat.py's plus a table with bytes and a unique column, and a scripted WebSocket. */
import { decode, encode } from "@msgpack/msgpack";
import type { SchemaJson } from "../../src/index.js";
import type { WebSocketLike } from "../../src/types.js";

export const SCHEMA: SchemaJson = {
  module: "test",
  tables: [
    {
      name: "user",
      public: true,
      primary_key: "identity",
      auto_inc: false,
      columns: [
        { name: "identity", type: { kind: "identity" } },
        { name: "name", type: { kind: "option", inner: { kind: "string" } } },
        { name: "online", type: { kind: "bool" } },
      ],
      indexes: [],
    },
    {
      name: "message",
      public: true,
      primary_key: "id",
      auto_inc: true,
      columns: [
        { name: "id", type: { kind: "i64" } },
        { name: "sender", type: { kind: "identity" } },
        { name: "sent", type: { kind: "timestamp" } },
        { name: "text", type: { kind: "string" } },
      ],
      indexes: [
        { name: "sender", columns: ["sender"], kind: "hash", unique: false },
        { name: "sent", columns: ["sent"], kind: "ordered", unique: false },
      ],
    },
    {
      name: "blob",
      public: true,
      primary_key: "digest",
      auto_inc: false,
      columns: [
        { name: "digest", type: { kind: "bytes" } },
        { name: "slug", type: { kind: "string" } },
        { name: "data", type: { kind: "option", inner: { kind: "bytes" } } },
        { name: "owner", type: { kind: "identity" } },
      ],
      indexes: [
        { name: "slug", columns: ["slug"], kind: "hash", unique: true },
        { name: "owner_slug", columns: ["owner", "slug"], kind: "hash", unique: true },
      ],
    },
  ],
  reducers: [{ name: "send_message", lifecycle: null, roles: null, params: [{ name: "text", type: { kind: "string" }, optional: false }] }],
};

type Msg = Record<string, unknown>;

/**
 * A WebSocket double driven by the test: it records what the client sends (decoded) and lets the
 * test play the server. Every instance is kept in `FakeWebSocket.instances`.
 */
export class FakeWebSocket implements WebSocketLike {
  static instances: FakeWebSocket[] = [];
  static last(): FakeWebSocket {
    const ws = FakeWebSocket.instances.at(-1);
    if (ws === undefined) throw new Error("no socket yet");
    return ws;
  }

  readonly url: string;
  readonly protocols: string[];
  protocol = "";
  readyState = 0;
  binaryType = "blob";
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  readonly sent: Msg[] = [];
  closedWith: number | null = null;

  constructor(url: string, protocols?: string | string[]) {
    this.url = url;
    this.protocols = protocols === undefined ? [] : Array.isArray(protocols) ? protocols : [protocols];
    FakeWebSocket.instances.push(this);
  }

  get json(): boolean {
    return this.protocol === "syncd.v1.json";
  }

  /** Accept the upgrade (picks the first offered subprotocol). */
  open(): void {
    this.protocol = this.protocols[0] ?? "";
    this.readyState = 1;
    this.onopen?.({});
  }

  send(data: string | Uint8Array | ArrayBuffer): void {
    if (this.readyState !== 1) throw new Error("not open");
    const msg = typeof data === "string" ? JSON.parse(data) : decode(data instanceof ArrayBuffer ? new Uint8Array(data) : data);
    this.sent.push(msg as Msg);
  }

  close(code = 1000): void {
    this.closedWith = code;
    this.serverClose(code, "");
  }

  /** The server sends one message (as JSON text or a MessagePack binary frame). */
  deliver(msg: Msg): void {
    const data = this.json ? JSON.stringify(msg) : encode(msg).slice().buffer;
    this.onmessage?.({ data });
  }

  serverClose(code: number, reason = ""): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  sentOfType(type: string): Msg[] {
    return this.sent.filter((m) => m.type === type);
  }

  welcome(fields: Partial<Msg> = {}): void {
    this.deliver({ type: "welcome", identity: "aa11", connection_id: "c1", epoch: 1, offset: 0, ...fields });
  }
}

/** Resolve after pending microtasks and timers of `ms`. */
export function tick(ms = 0): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Wait until `predicate` holds, polling; fails after `timeoutMs`. */
export async function eventually(predicate: () => boolean, timeoutMs = 2_000, what = "condition"): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await tick(5);
  }
}
