/** The connection logic against a scripted socket: resume, close codes, retries, token refresh. */
import assert from "node:assert/strict";
import { beforeEach, describe, it } from "node:test";
import { ConnectionError, ReducerError, SubscriptionError, SyncdClient, connect, type ConnectOptions } from "../../src/index.js";
import { base64Encode } from "../../src/base64.js";
import { FakeWebSocket, SCHEMA, eventually, tick } from "./fixtures.js";

const FAST = { baseMs: 1, capMs: 4, stableMs: 50 };

async function open(options: Partial<ConnectOptions> = {}, welcome: Record<string, unknown> = {}): Promise<{ client: SyncdClient; ws: FakeWebSocket }> {
  const n = FakeWebSocket.instances.length;
  const pending = connect({ url: "ws://fake:1/v1/ws", schema: SCHEMA, WebSocket: FakeWebSocket, reconnect: FAST, ...options });
  await eventually(() => FakeWebSocket.instances.length > n, 1000, "a socket");
  const ws = FakeWebSocket.last();
  ws.open();
  ws.welcome(welcome);
  return { client: await pending, ws };
}

/** Wait for the client's next socket, accept it and return it. */
async function nextSocket(after: FakeWebSocket): Promise<FakeWebSocket> {
  await eventually(() => FakeWebSocket.last() !== after, 2000, "a reconnect");
  const ws = FakeWebSocket.last();
  ws.open();
  return ws;
}

const msg = (id: number, text = `t${id}`) => [id, "aa11", 1000 + id, text];

beforeEach(() => {
  FakeWebSocket.instances = [];
});

describe("connect", () => {
  it("exposes the schema version of Welcome, null when the server does not send it", async () => {
    const { client } = await open({}, { schema_version: 3 });
    assert.equal(client.schemaVersion, 3);
    const { client: older } = await open();
    assert.equal(older.schemaVersion, null);
    await client.close();
    await older.close();
  });

  it("sends Hello first, with the token, and resolves after Welcome", async () => {
    const { client, ws } = await open({ token: "sk_test" }, { identity: "ab", offset: 9 });
    assert.deepEqual(ws.sent[0], { type: "hello", token: "sk_test" });
    assert.deepEqual(ws.protocols, ["syncd.v1.msgpack"]);
    assert.equal(client.identity, "ab");
    assert.equal(client.token, "sk_test");
    assert.deepEqual(client.cursor, { epoch: 1, offset: 9 });
    await client.close();
    assert.equal(ws.closedWith, 1000);
  });

  it("keeps the anonymous token the server minted", async () => {
    const { client } = await open({ format: "json" }, { token: "anon.x.sig" });
    assert.equal(client.token, "anon.x.sig");
    await client.close();
  });

  it("rejects with a ConnectionError when the first connection is refused", async () => {
    const pending = connect({ url: "ws://fake:1", schema: SCHEMA, WebSocket: FakeWebSocket, token: "bad" });
    await eventually(() => FakeWebSocket.instances.length === 1);
    const ws = FakeWebSocket.last();
    ws.open();
    ws.deliver({ type: "error", code: 2000, message: "invalid token" });
    ws.serverClose(4500, "unauthorized");
    await assert.rejects(pending, (e: unknown) => e instanceof ConnectionError && e.closeCode === 4500 && e.code === 2000 && /invalid token/.test(e.message));
    assert.equal(FakeWebSocket.instances.length, 1, "no reconnect");
  });
});

describe("calls", () => {
  it("resolves after the transaction that came with it is in the cache", async () => {
    const { client, ws } = await open();
    const sub = client.subscribe(["SELECT * FROM message"]);
    const s = ws.sentOfType("sub")[0]!;
    ws.deliver({ type: "applied", request_id: s.request_id, query_set_id: s.query_set_id, offset: 1, queries: [{ table: "message" }] });
    await sub.applied;
    const result = client.call("send_message", ["hi"]);
    const c = ws.sentOfType("call")[0]!;
    assert.equal(typeof c.idempotency_key, "string");
    ws.deliver({
      type: "batch",
      messages: [
        { type: "tx", epoch: 1, offset: 2, updates: [{ query_set_id: s.query_set_id, query_index: 0, delta: { table: "message", inserts: [msg(1, "hi")] } }] },
        { type: "result", request_id: c.request_id, ok: true, offset: 2 },
      ],
    });
    assert.deepEqual(await result, { offset: 2, value: null });
    assert.equal(client.table<{ text: string }>("message").find("id", 1)?.text, "hi");
    assert.deepEqual(client.cursor, { epoch: 1, offset: 2 });
    await client.close();
  });

  it("rejects a refused call with a ReducerError carrying the server's code and message", async () => {
    const { client, ws } = await open();
    const result = client.call("set_name", [""]);
    const c = ws.sentOfType("call")[0]!;
    ws.deliver({ type: "result", request_id: c.request_id, ok: false, code: 3000, message: "names must not be empty" });
    await assert.rejects(result, (e: unknown) => e instanceof ReducerError && e.code === 3000 && e.message === "names must not be empty");
    await client.close();
  });

  it("re-sends a call in flight after the reconnect with the same idempotency key", async () => {
    const { client, ws } = await open();
    const result = client.call("send_message", ["once"], { idempotencyKey: "key-1" });
    const first = ws.sentOfType("call")[0]!;
    assert.equal(first.idempotency_key, "key-1");
    ws.serverClose(1006);
    const ws2 = await nextSocket(ws);
    const again = ws2.sentOfType("call");
    assert.equal(again.length, 1);
    assert.equal(again[0]!.idempotency_key, "key-1");
    assert.deepEqual(again[0]!.args, ["once"]);
    assert.equal(ws2.sent[0]!.type, "hello", "Hello goes first");
    ws2.welcome();
    ws2.deliver({ type: "result", request_id: again[0]!.request_id, ok: true, offset: 5 });
    assert.deepEqual(await result, { offset: 5, value: null });
    await client.close();
  });

  it("waits while disconnected and sends once the connection is back", async () => {
    const { client, ws } = await open();
    ws.serverClose(4000, "restarting");
    const result = client.sql("SELECT * FROM user");
    const ws2 = await nextSocket(ws);
    ws2.welcome();
    const q = ws2.sentOfType("query")[0]!;
    ws2.deliver({ type: "query_result", request_id: q.request_id, ok: true, table: "user", rows: [["aa11", null, true]], offset: 3 });
    assert.deepEqual(await result, [{ identity: "aa11", name: null, online: true }]);
    await client.close();
  });

  it("fails waiting calls with a ConnectionError carrying the key when the close is terminal", async () => {
    const disconnects: unknown[] = [];
    const { client, ws } = await open({ onDisconnect: (i) => disconnects.push(i) });
    const result = client.call("send_message", ["x"], { idempotencyKey: "k9" });
    ws.deliver({ type: "error", code: 2003, message: "too many connections" });
    ws.serverClose(4501, "forbidden");
    await assert.rejects(result, (e: unknown) => e instanceof ConnectionError && e.closeCode === 4501 && e.idempotencyKey === "k9");
    assert.deepEqual(disconnects, [{ code: 4501, reason: "too many connections", willReconnect: false }]);
    await tick(20);
    assert.equal(FakeWebSocket.instances.length, 1, "4501 means do not reconnect");
    assert.ok(client.closed);
    await assert.rejects(client.call("send_message", ["y"]), ConnectionError);
  });

  it("stops on 1002 and does not reconnect with reconnect: false", async () => {
    for (const [options, code] of [[{}, 1002], [{ reconnect: false }, 1006]] as const) {
      FakeWebSocket.instances = [];
      const { client, ws } = await open(options);
      ws.serverClose(code);
      await tick(20);
      assert.equal(FakeWebSocket.instances.length, 1, `close ${code}`);
      assert.ok(client.closed);
    }
  });
});

describe("resume", () => {
  it("resumes from the cursor, then falls back to the snapshot with the right callbacks", async () => {
    const { client, ws } = await open();
    const events: string[] = [];
    const messages = client.table<{ id: number; text: string }>("message");
    messages.onInsert((r) => events.push(`insert ${r.id}`));
    messages.onUpdate((a, b) => events.push(`update ${a.id} ${a.text}->${b.text}`));
    messages.onDelete((r) => events.push(`delete ${r.id}`));
    const sub = client.subscribe(["SELECT * FROM message"]);
    const s = ws.sentOfType("sub")[0]!;
    ws.deliver({ type: "applied", request_id: s.request_id, query_set_id: s.query_set_id, offset: 10, queries: [{ table: "message", inserts: [msg(1), msg(2), msg(3)] }] });
    await sub.applied;
    const unchanged = messages.find("id", 1);
    events.length = 0;

    ws.serverClose(1001, "going away");
    const ws2 = await nextSocket(ws);
    assert.deepEqual(ws2.sent[0], {
      type: "hello",
      cursor: { epoch: 1, offset: 10 },
      query_sets: [{ query_set_id: s.query_set_id, queries: ["SELECT * FROM message"] }],
    });
    assert.equal(ws2.sentOfType("sub").length, 0, "an applied set is resumed in Hello, not subscribed again");
    // A new epoch: the server cannot resume and sends the set's current rows.
    ws2.welcome({ epoch: 2, offset: 3 });
    assert.deepEqual(client.cursor, { epoch: 1, offset: 10 }, "the cursor waits for the resumed sets");
    ws2.deliver({
      type: "applied",
      request_id: null,
      query_set_id: s.query_set_id,
      offset: 3,
      resumed: false,
      queries: [{ table: "message", inserts: [msg(1), msg(2, "edited"), msg(4)] }],
    });
    assert.deepEqual(events.sort(), ["delete 3", "insert 4", "update 2 t2->edited"]);
    assert.equal(messages.find("id", 1), unchanged, "unchanged rows do not flicker");
    assert.deepEqual(client.cursor, { epoch: 2, offset: 3 });
    assert.equal(sub.lastResumed, false);
    assert.deepEqual(messages.rows().map((r) => r.id).sort(), [1, 2, 4]);
    await client.close();
  });

  it("applies a resumed delta, ignoring deletes of rows it never held", async () => {
    const { client, ws } = await open();
    const sub = client.subscribe(["SELECT * FROM message"]);
    const s = ws.sentOfType("sub")[0]!;
    ws.deliver({ type: "applied", request_id: s.request_id, query_set_id: s.query_set_id, offset: 10, queries: [{ table: "message", inserts: [msg(1), msg(2)] }] });
    await sub.applied;
    ws.serverClose(1006);
    const ws2 = await nextSocket(ws);
    ws2.welcome({ offset: 12 });
    ws2.deliver({
      type: "applied",
      request_id: null,
      query_set_id: s.query_set_id,
      offset: 12,
      resumed: true,
      queries: [{ table: "message", inserts: [msg(3)], deletes: [1, 77] }],
    });
    assert.deepEqual(client.table<{ id: number }>("message").rows().map((r) => r.id).sort(), [2, 3]);
    assert.equal(sub.lastResumed, true);
    assert.deepEqual(client.cursor, { epoch: 1, offset: 12 });
    await client.close();
  });

  it("re-sends an unanswered Subscribe after Hello instead of listing it", async () => {
    const { client, ws } = await open();
    const sub = client.subscribe(["SELECT * FROM user"]);
    ws.serverClose(1006);
    const ws2 = await nextSocket(ws);
    assert.deepEqual(ws2.sent[0], { type: "hello" });
    const s = ws2.sentOfType("sub")[0]!;
    assert.deepEqual(s.queries, ["SELECT * FROM user"]);
    ws2.welcome();
    ws2.deliver({ type: "applied", request_id: s.request_id, query_set_id: s.query_set_id, offset: 1, queries: [{ table: "user", inserts: [["aa11", "ann", true]] }] });
    await sub.applied;
    assert.equal(client.table("user").count(), 1);
    await client.close();
  });

  it("drops the rows of a set the server can no longer resume, and tells onError", async () => {
    const { client, ws } = await open();
    const sub = client.subscribe(["SELECT * FROM message"]);
    const s = ws.sentOfType("sub")[0]!;
    ws.deliver({ type: "applied", request_id: s.request_id, query_set_id: s.query_set_id, offset: 1, queries: [{ table: "message", inserts: [msg(1)] }] });
    await sub.applied;
    const errors: unknown[] = [];
    sub.onError((e) => errors.push(e));
    ws.serverClose(4003);
    const ws2 = await nextSocket(ws);
    ws2.welcome();
    ws2.deliver({ type: "sub_failed", request_id: null, query_set_id: s.query_set_id, code: 3100, message: "no table named message" });
    assert.equal(client.table("message").count(), 0);
    assert.equal(errors.length, 1);
    assert.ok(errors[0] instanceof SubscriptionError);
    await client.close();
  });
});

describe("subscriptions", () => {
  it("rejects applied for a refused set and leaves the cache alone", async () => {
    const { client, ws } = await open();
    const sub = client.subscribe(["SELECT nope"]);
    const errors: unknown[] = [];
    sub.onError((e) => errors.push(e));
    const s = ws.sentOfType("sub")[0]!;
    ws.deliver({ type: "sub_failed", request_id: s.request_id, query_set_id: s.query_set_id, code: 3100, message: "the query needs FROM <table>" });
    await assert.rejects(sub.applied, (e: unknown) => e instanceof SubscriptionError && e.code === 3100 && e.queries[0] === "SELECT nope");
    assert.equal(errors.length, 1);
    await client.close();
  });

  it("drops rows on unsubscribe and ignores updates that still arrive for the set", async () => {
    const { client, ws } = await open();
    const a = client.subscribe(["SELECT * FROM message"]);
    const b = client.subscribe(["SELECT * FROM message WHERE id = 1"]);
    const [sa, sb] = ws.sentOfType("sub");
    ws.deliver({ type: "applied", request_id: sa!.request_id, query_set_id: sa!.query_set_id, offset: 1, queries: [{ table: "message", inserts: [msg(1), msg(2)] }] });
    ws.deliver({ type: "applied", request_id: sb!.request_id, query_set_id: sb!.query_set_id, offset: 1, queries: [{ table: "message", inserts: [msg(1)] }] });
    await Promise.all([a.applied, b.applied]);
    const done = a.unsubscribe();
    assert.deepEqual(client.table<{ id: number }>("message").rows().map((r) => r.id), [1], "row 1 stays: set b matches it");
    ws.deliver({ type: "tx", epoch: 1, offset: 2, updates: [{ query_set_id: sa!.query_set_id, query_index: 0, delta: { table: "message", inserts: [msg(3)] } }] });
    assert.equal(client.table("message").count(), 1);
    const u = ws.sentOfType("unsub")[0]!;
    ws.deliver({ type: "unsubbed", request_id: u.request_id, query_set_id: sa!.query_set_id });
    await done;
    await client.close();
  });
});

describe("tokens", () => {
  it("asks getToken again and resumes after 4002 REAUTHENTICATE", async () => {
    let n = 0;
    const { client, ws } = await open({ getToken: () => `sk_token_${++n}` });
    assert.equal(ws.sent[0]!.token, "sk_token_1");
    ws.serverClose(4002, "token expired");
    const ws2 = await nextSocket(ws);
    assert.equal(ws2.sent[0]!.token, "sk_token_2");
    ws2.welcome();
    assert.equal(client.token, "sk_token_2");
    await client.close();
  });

  it("stops after 4002 when there is no getToken to ask for a fresh token", async () => {
    const { client, ws } = await open({ token: "expired.jwt.token" });
    ws.serverClose(4002, "token expired");
    await tick(20);
    assert.equal(FakeWebSocket.instances.length, 1);
    assert.ok(client.closed);
  });

  it("tries a fresh token once after 4500, then stops", async () => {
    const { client, ws } = await open({ getToken: () => "sk_revoked" });
    ws.serverClose(4500);
    const ws2 = await nextSocket(ws);
    ws2.serverClose(4500);
    await tick(20);
    assert.equal(FakeWebSocket.instances.length, 2);
    assert.ok(client.closed);
  });

  it("sends Reauth before a JWT expires, on the same connection", async () => {
    const jwt = (expMs: number, tag: string) => {
      const part = (o: object) => base64Encode(new TextEncoder().encode(JSON.stringify(o))).replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
      return `${part({ alg: "HS256" })}.${part({ sub: "u", exp: expMs / 1000, tag })}.sig`;
    };
    const tokens = [jwt(Date.now() + 1_500, "first"), jwt(Date.now() + 3_600_000, "second")];
    let calls = 0;
    const { client, ws } = await open({ getToken: () => tokens[Math.min(calls++, 1)] as string });
    await eventually(() => ws.sentOfType("reauth").length === 1, 3_000, "a Reauth");
    assert.equal(ws.sentOfType("reauth")[0]!.token, tokens[1]);
    assert.equal(FakeWebSocket.instances.length, 1, "the connection was not dropped");
    assert.equal(client.token, tokens[1]);
    await client.close();
  });
});

describe("liveness", () => {
  it("drops a connection whose Ping goes unanswered and resumes on a new one", async () => {
    const disconnects: number[] = [];
    const { client, ws } = await open({ pingIntervalMs: 20, onDisconnect: (i) => disconnects.push(i.code) });
    await eventually(() => ws.sentOfType("ping").length === 1, 1000, "a Ping");
    const ws2 = await nextSocket(ws);
    assert.deepEqual(disconnects, [1006]);
    ws2.welcome();
    // A connection that answers stays up.
    for (let i = 0; i < 3; i++) {
      await eventually(() => ws2.sentOfType("ping").length === i + 1, 1000, "a Ping");
      ws2.deliver({ type: "pong", nonce: ws2.sentOfType("ping")[i]!.nonce as number });
    }
    assert.equal(FakeWebSocket.last(), ws2);
    await client.close();
  });

  it("gives up on a reconnect that brings no Welcome and tries again", async () => {
    const { client, ws } = await open({ connectTimeoutMs: 30 });
    ws.serverClose(1006);
    const silent = await nextSocket(ws);
    const ws3 = await nextSocket(silent);
    ws3.welcome();
    await eventually(() => client.connected, 1000, "the connection");
    await client.close();
  });

  it("rejects a call whose arguments cannot be encoded, and carries on", async () => {
    const { client, ws } = await open({ format: "json" });
    await assert.rejects(client.call("send_message", [2n ** 60n]), RangeError);
    const ok = client.call("send_message", ["fine"]);
    const c = ws.sentOfType("call")[0]!;
    ws.deliver({ type: "result", request_id: c.request_id, ok: true, offset: 1 });
    assert.deepEqual(await ok, { offset: 1, value: null });
    await client.close();
  });

  for (const format of ["msgpack", "json"] as const) {
    it(`resolves with the reducer's returned value, bytes decoded by its declared type (${format})`, async () => {
      const reducers = [
        ...SCHEMA.reducers,
        { name: "blob", lifecycle: null, roles: null, params: [], returns: { kind: "bytes" as const } },
        { name: "count", lifecycle: null, roles: null, params: [], returns: { kind: "i64" as const } },
      ];
      const { client, ws } = await open({ format, schema: { ...SCHEMA, reducers } });
      const blob = client.call<Uint8Array>("blob", []);
      const count = client.call<number>("count", []);
      const [b, n] = ws.sentOfType("call");
      // Over JSON bytes are base64 text; over MessagePack the test's server sends the same text,
      // which must then stay a string (only the JSON subprotocol carries bytes as base64).
      ws.deliver({ type: "result", request_id: b!.request_id, ok: true, offset: 3, value: "AAEC" });
      ws.deliver({ type: "result", request_id: n!.request_id, ok: true, value: 7 });
      const expected = format === "json" ? new Uint8Array([0, 1, 2]) : "AAEC";
      assert.deepEqual(await blob, { offset: 3, value: expected });
      assert.deepEqual(await count, { offset: null, value: 7 });
      await client.close();
    });
  }
});

describe("following a migration", () => {
  /** SCHEMA at stored version `version`, message's text column named `text`. */
  function schemaV(version: number, text = "text"): Record<string, unknown> {
    const copy = JSON.parse(JSON.stringify(SCHEMA)) as { tables: { name: string; columns: { name: string }[] }[] };
    const message = copy.tables.find((t) => t.name === "message")!;
    message.columns[3]!.name = text;
    return { ...copy, schema_version: version };
  }

  /** A `fetch` answering `answers` in order (the last one from then on); a function answer is called. */
  function scripted(answers: unknown[]): { fetch: NonNullable<ConnectOptions["fetch"]>; reads: () => number } {
    let reads = 0;
    const fetch = async (_url: string) => {
      const answer = answers[Math.min(reads, answers.length - 1)];
      reads += 1;
      if (typeof answer === "function") return (answer as () => Promise<{ ok: boolean; status: number; json(): Promise<unknown> }>)();
      return { ok: true, status: 200, json: async () => answer };
    };
    return { fetch, reads: () => reads };
  }

  /** Connected at schema version 1 with one live set over message holding row 1. */
  async function liveAtV1(answers: unknown[], options: Partial<ConnectOptions> = {}) {
    const script = scripted([schemaV(1), ...answers]);
    const pending = connect({ url: "ws://fake:1/v1/ws", fetch: script.fetch, WebSocket: FakeWebSocket, reconnect: FAST, ...options });
    await eventually(() => FakeWebSocket.instances.length > 0, 1000, "a socket");
    const ws = FakeWebSocket.last();
    ws.open();
    ws.welcome({ schema_version: 1, offset: 1 });
    const client = await pending;
    const sub = client.subscribe(["SELECT * FROM message"]);
    const s = ws.sentOfType("sub")[0]!;
    ws.deliver({ type: "applied", request_id: s.request_id, query_set_id: s.query_set_id, offset: 1, queries: [{ table: "message", inserts: [msg(1, "one")] }] });
    await sub.applied;
    return { client, ws, sub, qs: s.query_set_id as number, reads: script.reads };
  }

  function resumeAtV2(ws: FakeWebSocket, qs: number): void {
    ws.welcome({ schema_version: 2, offset: 3 });
    ws.deliver({ type: "applied", request_id: null, query_set_id: qs, offset: 3, resumed: false, queries: [{ table: "message", inserts: [msg(1, "one"), msg(2, "two")] }] });
  }

  const texts = (client: SyncdClient, column: string) => client.table<Record<string, unknown>>("message").rows().map((r) => String(r[column])).sort();

  it("does not read rows with a schema of another version than Welcome's; it reconnects and reads again", async () => {
    const { client, ws, qs, reads } = await liveAtV1([schemaV(1), schemaV(2, "body")]);
    ws.serverClose(1012, "restarting");
    const second = await nextSocket(ws);
    resumeAtV2(second, qs);
    const third = await nextSocket(second); // the v1 answer made it drop the socket
    resumeAtV2(third, qs);
    await eventually(() => texts(client, "body").length === 2, 2000, "rows in the new layout");
    assert.deepEqual(texts(client, "body"), ["one", "two"]);
    assert.equal(reads(), 3);
    await client.close();
  });

  it("a /v1/schema that answers garbage or fails drops the socket and is read again; nothing is applied with it", async () => {
    const errors: unknown[] = [];
    const garbage = ["nope", null, { tables: 5 }, () => Promise.resolve({ ok: false, status: 500, json: async () => ({}) }), () => Promise.reject(new Error("reset"))];
    const { client, ws, qs, reads } = await liveAtV1([...garbage, schemaV(2, "body")], { onError: (e) => errors.push(e) });
    let socket = ws;
    socket.serverClose(1012, "restarting");
    for (let i = 0; i <= garbage.length; i++) {
      socket = await nextSocket(socket);
      resumeAtV2(socket, qs);
      if (i < garbage.length) await eventually(() => FakeWebSocket.last() !== socket, 2000, `dropped after answer ${i}`);
    }
    await eventually(() => texts(client, "body").length === 2, 2000, "rows in the new layout");
    assert.equal(reads(), 2 + garbage.length);
    assert.deepEqual(texts(client, "body"), ["one", "two"]);
    await client.close();
  });

  it("a /v1/schema that never answers drops the socket after connectTimeoutMs", async () => {
    const hang = () => new Promise<never>(() => {});
    const { client, ws, qs } = await liveAtV1([hang, schemaV(2, "body")], { connectTimeoutMs: 200 });
    ws.serverClose(1012, "restarting");
    const second = await nextSocket(ws);
    resumeAtV2(second, qs);
    const third = await nextSocket(second);
    resumeAtV2(third, qs);
    await eventually(() => texts(client, "body").length === 2, 2000, "rows in the new layout");
    await client.close();
  });

  it("messages that wait for the schema are bounded: past the limit the socket is dropped", async () => {
    const before = SyncdClient.heldBytesLimit;
    SyncdClient.heldBytesLimit = 10_000;
    try {
      let answer: (v: { ok: boolean; status: number; json(): Promise<unknown> }) => void = () => {};
      const slow = () => new Promise<{ ok: boolean; status: number; json(): Promise<unknown> }>((resolve) => (answer = resolve));
      const { client, ws, qs } = await liveAtV1([slow, schemaV(2, "body")]);
      ws.serverClose(1012, "restarting");
      const second = await nextSocket(ws);
      resumeAtV2(second, qs);
      for (let offset = 4; offset < 40 && FakeWebSocket.last() === second; offset++) {
        second.deliver({ type: "tx", epoch: 1, offset, updates: [{ query_set_id: qs, query_index: 0, delta: { table: "message", inserts: [msg(offset, "x".repeat(1000))] } }] });
      }
      const third = await nextSocket(second);
      answer({ ok: true, status: 200, json: async () => schemaV(2, "body") }); // too late for the second socket
      resumeAtV2(third, qs);
      await eventually(() => texts(client, "body").length === 2, 2000, "rows in the new layout");
      await client.close();
    } finally {
      SyncdClient.heldBytesLimit = before;
    }
  });
});
