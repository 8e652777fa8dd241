/** The TypeScript client against a real `syncd serve schema/chat.py`, in both wire formats. */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  ConnectionError,
  QueryError,
  ReducerError,
  SubscriptionError,
  connect,
  type ConnectOptions,
  type SchemaJson,
  type SyncdClient,
  type WireFormat,
} from "../../src/index.js";
import { Gate, SyncdServer, eventually, hs256Token, sleep } from "./server.js";

interface User {
  identity: string;
  name: string | null;
  online: boolean;
}
interface Message {
  id: number;
  sender: string;
  sent: number;
  text: string;
}

const server = new SyncdServer();
let schema: SchemaJson;
const clients: SyncdClient[] = [];

before(async () => {
  await server.start();
  schema = (await server.schema()) as SchemaJson;
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await server.stop();
});

async function client(format: WireFormat, options: Partial<ConnectOptions> = {}): Promise<SyncdClient> {
  const gate = options.WebSocket ? null : new Gate();
  const c = await connect({
    url: server.wsUrl,
    schema,
    format,
    WebSocket: gate?.WebSocket,
    reconnect: { baseMs: 20, capMs: 200 },
    ...options,
  });
  clients.push(c);
  return c;
}

for (const format of ["msgpack", "json"] as const) {
  describe(`with ${format}`, () => {
    it("fetches the schema itself, subscribes, calls, and sees the effects through callbacks", async () => {
      const gate = new Gate();
      const alice = await connect({ url: server.wsUrl, format, WebSocket: gate.WebSocket });
      clients.push(alice);
      assert.match(alice.identity ?? "", /^[0-9a-f]{64}$/);
      assert.match(alice.token ?? "", /^anon\./);
      const bob = await client(format);
      const inserted: Message[] = [];
      const renamed: Array<[User, User]> = [];
      alice.table<Message>("message").onInsert((m) => inserted.push(m));
      alice.table<User>("user").onUpdate((a, b) => renamed.push([a, b]));
      const sub = alice.subscribe(["SELECT * FROM message", "SELECT * FROM user"]);
      await sub.applied;
      assert.equal(alice.table<User>("user").find("identity", alice.identity)?.online, true);

      const text = `hello from bob (${format})`;
      await bob.call("set_name", ["bob"]);
      const { offset } = await bob.call("send_message", [text]);
      assert.equal(typeof offset, "number");
      await eventually(() => inserted.some((m) => m.text === text), "alice sees bob's message");
      const mine = alice.table<Message>("message").filter("sender", bob.identity);
      assert.deepEqual(mine.map((m) => m.text), [text]);
      assert.equal(typeof mine[0]!.sent, "number");
      await eventually(() => renamed.some(([a, b]) => b.identity === bob.identity && b.name === "bob" && a.name === null), "the rename");
      assert.equal(alice.table<User>("user").find("identity", bob.identity)?.name, "bob");
    });

    it("shows the caller its own write before the call resolves", async () => {
      const carol = await client(format);
      await carol.subscribe([`SELECT * FROM message WHERE sender = :sender`]).applied;
      const { offset } = await carol.call("send_message", ["read your writes"]);
      assert.deepEqual(carol.table<Message>("message").rows().map((m) => m.text), ["read your writes"]);
      assert.ok(offset !== null && carol.cursor !== null && carol.cursor.offset >= offset);
    });

    it("rejects a failing reducer with a ReducerError", async () => {
      const c = await client(format);
      await assert.rejects(c.call("set_name", [""]), (e: unknown) => e instanceof ReducerError && e.code === 3000 && e.message === "names must not be empty");
      await assert.rejects(c.call("no_such_reducer", []), (e: unknown) => e instanceof ReducerError && e.code === 3002);
      await assert.rejects(c.call("set_name", []), (e: unknown) => e instanceof ReducerError && e.code === 3001);
    });

    it("fails a subscription with bad SQL, and a one-off query too", async () => {
      const c = await client(format);
      const sub = c.subscribe(["SELECT * FROM nowhere"]);
      const seen: unknown[] = [];
      sub.onError((e) => seen.push(e));
      await assert.rejects(sub.applied, (e: unknown) => e instanceof SubscriptionError && e.code === 3100);
      assert.equal(seen.length, 1);
      await assert.rejects(c.sql("SELECT FROM"), (e: unknown) => e instanceof QueryError && e.code === 3100);
      const users = await c.sql<User>("SELECT * FROM user WHERE online = true");
      assert.ok(users.some((u) => u.identity === c.identity));
    });

    it("keeps a row two subscriptions share until both are gone", async () => {
      const c = await client(format);
      await c.call("send_message", ["shared row"]);
      const all = c.subscribe(["SELECT * FROM message WHERE sender = :sender"]);
      const same = c.subscribe(["SELECT * FROM message WHERE sender = :sender"]);
      await Promise.all([all.applied, same.applied]);
      assert.equal(c.table("message").filter("sender", c.identity).length, 1);
      await all.unsubscribe();
      assert.equal(c.table("message").filter("sender", c.identity).length, 1);
      await same.unsubscribe();
      assert.equal(c.table("message").filter("sender", c.identity).length, 0);
    });

    it("resumes after the network drops: keeps its cache and receives what it missed", async () => {
      const gate = new Gate();
      const disconnects: number[] = [];
      const alice = await client(format, { WebSocket: gate.WebSocket, onDisconnect: (i) => disconnects.push(i.code) });
      const bob = await client(format);
      const sub = alice.subscribe(["SELECT * FROM message", "SELECT * FROM user"]);
      await sub.applied;
      await bob.call("send_message", [`before the drop (${format})`]);
      await eventually(() => alice.table<Message>("message").filter("sender", bob.identity).length === 1, "the first message");
      const before = alice.table<Message>("message").count();
      const inserted: string[] = [];
      alice.table<Message>("message").onInsert((m) => inserted.push(m.text));

      gate.open = false;
      gate.current.terminate();
      await eventually(() => disconnects.length === 1, "the drop");
      assert.equal(disconnects[0], 1006);
      assert.equal(alice.table("message").count(), before, "the cache is kept while disconnected");
      const missed = [`missed 1 (${format})`, `missed 2 (${format})`];
      for (const text of missed) await bob.call("send_message", [text]);
      // A call made while disconnected waits for the connection.
      const late = alice.call("send_message", [`sent while away (${format})`]);
      await sleep(100);
      assert.equal(alice.connected, false, "still held back by the gate");

      gate.open = true;
      assert.deepEqual(await late.then((r) => typeof r.offset), "number");
      await eventually(() => missed.every((t) => inserted.includes(t)), "the missed messages");
      assert.equal(sub.lastResumed, true, "resumed from the cursor, not a fresh snapshot");
      assert.equal(alice.table("message").count(), before + 3);
      assert.ok(inserted.includes(`sent while away (${format})`));
    });

    it("applies a call once when its answer was lost and it is sent again", async () => {
      const gate = new Gate();
      const alice = await client(format, { WebSocket: gate.WebSocket });
      const text = `exactly once (${format}) ${Math.random()}`;
      await alice.subscribe(["SELECT * FROM message WHERE sender = :sender"]).applied;
      gate.loseNextResult = true;
      const first = gate.current;
      const result = await alice.call("send_message", [text]);
      assert.notEqual(gate.current, first, "the answer was lost and the call went out again on a new connection");
      const rows = await alice.sql<Message>("SELECT * FROM message WHERE sender = :sender");
      assert.equal(rows.filter((m) => m.text === text).length, 1);
      assert.equal(alice.table<Message>("message").rows().filter((m) => m.text === text).length, 1);
      const again = await alice.call("send_message", [text]);
      assert.notEqual(again.offset, result.offset, "a new call gets a new key");
    });

    it("answers a retried idempotency key with the first result", async () => {
      const c = await client(format);
      const key = `retry-${format}-${Math.random()}`;
      const first = await c.call("send_message", ["idempotent"], { idempotencyKey: key });
      const second = await c.call("send_message", ["idempotent"], { idempotencyKey: key });
      assert.deepEqual(second, first);
      const rows = await c.sql<Message>("SELECT * FROM message WHERE sender = :sender");
      assert.equal(rows.filter((m) => m.text === "idempotent").length, 1);
    });
  });
}

describe("several replica URLs", () => {
  it("skips a URL that does not answer, for the schema and the connection", async () => {
    // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    const dead = "ws://127.0.0.1:9/v1/ws";
    const gate = new Gate();
    const c = await connect({
      url: [dead, server.wsUrl],
      WebSocket: gate.WebSocket,
      reconnect: { baseMs: 20, capMs: 200 },
    });
    clients.push(c);
    assert.ok(c.identity);
    const sub = c.subscribe(["SELECT * FROM message"]);
    await sub.applied;
    await c.call("send_message", ["through the second URL"]);
    assert.ok(c.table<Message>("message").rows().some((m) => m.text === "through the second URL"));
  });

  it("rejects when no URL answers", async () => {
    await assert.rejects(
      connect({
        url: ["ws://127.0.0.1:9/v1/ws", "ws://127.0.0.1:9/v1/ws"],
        schema,
        WebSocket: new Gate().WebSocket,
        reconnect: false,
      }),
      ConnectionError,
    );
  });
});

describe("tokens", () => {
  it("refreshes a JWT before it expires with Reauth, without dropping the connection", async () => {
    let issued = 0;
    const disconnects: number[] = [];
    const c = await client("msgpack", {
      getToken: () => {
        issued++;
        // Whole-second `exp`: 2-3 s left, so the refresh lands a second or more ahead of expiry.
        return hs256Token("ts-user", 3);
      },
      onDisconnect: (i) => disconnects.push(i.code),
    });
    const identity = c.identity;
    const connectionId = c.connectionId;
    await eventually(() => issued >= 2, "a refresh", 3_000);
    await sleep(2_100); // past the first token's expiry
    assert.deepEqual(disconnects, []);
    assert.equal(c.connectionId, connectionId);
    assert.equal(c.identity, identity);
    await c.call("set_name", ["jwt user"]);
  });

  it("reconnects with a fresh token and resumes when the server closes with 4002", async () => {
    let issued = 0;
    const disconnects: Array<{ code: number; willReconnect: boolean }> = [];
    const c = await client("json", {
      getToken: async () => {
        issued++;
        if (issued === 1) return hs256Token("ts-expiring", 1);
        // The proactive refresh is too late: the server closes at `exp` first.
        if (issued === 2) await sleep(1_500);
        return hs256Token("ts-expiring", 3_600);
      },
      onDisconnect: (i) => disconnects.push({ code: i.code, willReconnect: i.willReconnect }),
    });
    const identity = c.identity;
    const sub = c.subscribe(["SELECT * FROM user WHERE identity = :sender"]);
    await sub.applied;
    await eventually(() => disconnects.length === 1, "the 4002 close", 4_000);
    assert.deepEqual(disconnects[0], { code: 4002, willReconnect: true });
    await c.call("set_name", ["refreshed"]);
    assert.equal(c.identity, identity);
    assert.equal(sub.lastResumed, true);
    assert.equal(c.table<User>("user").find("identity", identity)?.name, "refreshed");
  });

  it("rejects connect with a ConnectionError for a bad token", async () => {
    await assert.rejects(
      connect({ url: server.wsUrl, schema, token: "not-a-token", WebSocket: new Gate().WebSocket, reconnect: false }),
      (e: unknown) => e instanceof ConnectionError && e.closeCode === 4500,
    );
  });
});

describe("server restart", () => {
  it("reconnects by itself after the server is killed and restarted, and catches up", async () => {
    const own = new SyncdServer();
    await own.start();
    try {
      const alice = await connect({
        url: own.wsUrl,
        WebSocket: new Gate().WebSocket,
        reconnect: { baseMs: 50, capMs: 300 },
      });
      clients.push(alice);
      const connects: boolean[] = [];
      alice.onConnect((i) => connects.push(i.reconnected));
      const sub = alice.subscribe(["SELECT * FROM message"]);
      await sub.applied;
      await alice.call("send_message", ["before the restart"]);
      const identity = alice.identity;

      await own.kill();
      await eventually(() => !alice.connected, "the drop");
      const pending = alice.call("send_message", ["queued while the server was down"]);
      await own.start(); // same port, same data dir
      const bob = await connect({ url: own.wsUrl, WebSocket: new Gate().WebSocket });
      clients.push(bob);
      await bob.call("send_message", ["sent after the restart"]);

      await pending;
      await eventually(() => connects.includes(true), "the reconnect", 10_000);
      const texts = () => alice.table<Message>("message").rows().map((m) => m.text).sort();
      await eventually(() => texts().length === 3, "catching up");
      assert.deepEqual(texts(), ["before the restart", "queued while the server was down", "sent after the restart"]);
      assert.equal(alice.identity, identity, "the minted token kept the identity");
    } finally {
      await own.stop();
    }
  });
});
