/**
 * `connect({ store })` against a real `syncd serve schema/kled.py`: the cache, identity and
 * unsent writes survive a restart while the server is down; every write runs exactly once.
 */
import assert from "node:assert/strict";
import { after, before, it } from "node:test";
import WebSocket from "ws";
import { ConnectionError, connect, memoryStore, type SyncdClient, type WebSocketConstructor } from "../../src/index.js";
import { SyncdServer, eventually } from "./server.js";

interface Workspace {
  id: number;
  owner: string;
  name: string;
  edits: number;
}

const server = new SyncdServer("schema/kled.py");
const open: SyncdClient[] = [];
const WS = WebSocket as unknown as WebSocketConstructor;
const fast = { baseMs: 20, capMs: 100 };

before(() => server.start());
after(async () => {
  await Promise.all(open.map((c) => c.close()));
  await server.stop();
});

async function client(store: ReturnType<typeof memoryStore>): Promise<SyncdClient> {
  const c = await connect({ url: server.wsUrl, WebSocket: WS, store, reconnect: fast, connectTimeoutMs: 2_000 });
  open.push(c);
  return c;
}

it("restarts offline with its rows, keeps its writes, and sends each once when the server is back", async () => {
  const store = memoryStore();
  const first = await client(store);
  first.subscribe(["SELECT * FROM workspace WHERE owner = :sender"]);
  const created = await first.call<number>("create_workspace", ["home"]);
  const id = created.value;
  await first.increment("workspace", id, "edits", 1);
  const identity = first.identity;
  await first.close();
  await server.kill();

  const offline = await client(store);
  assert.equal(offline.connected, false, "connect resolves while the server is down");
  assert.equal(offline.identity, identity);
  assert.equal(offline.table<Workspace>("workspace").find("id", id)?.edits, 1, "the saved rows are served");
  const call = offline.call("create_workspace", ["offline"]);
  const inc = offline.increment("workspace", id, "edits", 1);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(store.snapshot().writes.length, 2, "both writes are saved before they are sent");
  await offline.close();
  await assert.rejects(call, ConnectionError);
  await assert.rejects(inc, ConnectionError);
  assert.equal(store.snapshot().writes.length, 2, "closing offline keeps them");

  await server.start();
  const back = await client(store);
  assert.equal(back.identity, identity, "the saved token keeps the anonymous identity");
  assert.equal(back.restored.length, 2);
  await Promise.all(back.restored);
  const workspaces = back.table<Workspace>("workspace");
  await eventually(() => workspaces.count() === 2 && workspaces.find("id", id)?.edits === 2, "both writes applied");
  assert.equal(store.snapshot().writes.length, 0, "answered writes are forgotten");
  await back.close();

  const last = await client(store);
  assert.equal(last.restored.length, 0);
  const rows = await last.sql<Workspace>("SELECT * FROM workspace");
  const mine = rows.filter((r) => r.owner === identity);
  assert.equal(mine.length, 2, "the offline call ran once");
  assert.equal(mine.find((r) => r.id === id)?.edits, 2, "the offline increment ran once");
});

it("an offline client connects and resumes by itself when the server returns", async () => {
  const store = memoryStore();
  const first = await client(store);
  await first.subscribe(["SELECT * FROM workspace WHERE owner = :sender"]).applied;
  await first.call("create_workspace", ["one"]);
  await first.close();
  await server.kill();
  const c = await client(store);
  assert.equal(c.connected, false);
  const queued = c.call("create_workspace", ["two"]);
  await server.start();
  await queued;
  await eventually(() => c.connected && c.table<Workspace>("workspace").count() === 2, "resumed with both rows", 10_000);
});

it("a store that never connected cannot serve offline", async () => {
  await assert.rejects(
    connect({ url: "ws://127.0.0.1:9/v1/ws", WebSocket: WS, store: memoryStore(), reconnect: false, connectTimeoutMs: 1_000 }),
    ConnectionError,
  );
});
