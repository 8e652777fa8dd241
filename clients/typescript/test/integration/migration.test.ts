/**
 * The client across module migrations: a real `syncd serve` restarted on one data directory with
 * a changed module (tests/modules/shop_v1.py -> shop_v2.py: column `color` added with a default;
 * -> shop_v3_private.py: table `item` made private). docs/protocol.md "Schema changes".
 */
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import { StaleBindingsError, SubscriptionError, connect, staleDifferences, type SchemaJson, type SyncdClient } from "../../src/index.js";
import { Gate, SyncdServer, eventually } from "./server.js";

const V1 = "tests/modules/shop_v1.py";
const V2 = "tests/modules/shop_v2.py";
const V3 = "tests/modules/shop_v3_private.py";

interface Item {
  id: number;
  color?: string;
  name: string;
  price: number;
}

const servers: SyncdServer[] = [];
const clients: SyncdClient[] = [];

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await Promise.all(servers.map((s) => s.stop()));
});

async function shop(module: string): Promise<SyncdServer> {
  const server = new SyncdServer(module);
  servers.push(server);
  await server.start();
  return server;
}

/** Kill the server and start it on the same port and data with `module` (a migration). */
async function restartWith(server: SyncdServer, module: string): Promise<void> {
  await server.kill();
  server.module = module;
  await server.start();
}

async function open(server: SyncdServer, options: { bindings?: SchemaJson; onError?: (e: Error) => void } = {}): Promise<SyncdClient> {
  const client = await connect({ url: server.wsUrl, WebSocket: new Gate().WebSocket, reconnect: { baseMs: 20, capMs: 200 }, ...options });
  clients.push(client);
  return client;
}

for (const format of ["msgpack", "json"] as const) {
  describe(`across a migration (${format})`, () => {
    it("keeps the subscription handle, shows the new column as updates, and goes on from the cursor", async () => {
      const server = await shop(V1);
      const client = await connect({ url: server.wsUrl, format, WebSocket: new Gate().WebSocket, reconnect: { baseMs: 20, capMs: 200 } });
      clients.push(client);
      await client.call("put_items", [0, 5]);
      const items = client.table<Item>("item");
      const sub = client.subscribe(["SELECT * FROM item"]);
      await sub.applied;
      assert.equal(items.count(), 5);
      assert.equal(client.schemaVersion, 1);
      const before = client.cursor;
      const updated: Array<[Item, Item]> = [];
      const deleted: Item[] = [];
      items.onUpdate((a, b) => updated.push([a, b]));
      items.onDelete((r) => deleted.push(r));

      await restartWith(server, V2);
      await eventually(() => items.find("id", 3)?.color === "none", "rows in the new layout", 15_000);
      assert.equal(client.schemaVersion, 2);
      assert.equal(sub.lastResumed, false);
      assert.deepEqual(items.find("id", 3), { id: 3, color: "none", name: "item3", price: 3 });
      assert.equal(updated.length, 5);
      assert.ok(updated.every(([a, b]) => a.color === undefined && b.color === "none"));
      assert.equal(deleted.length, 0);
      assert.deepEqual(items.filter("color", "none").length, 5); // the new index is kept too
      const after = client.cursor;
      assert.ok(before !== null && after !== null && after.epoch === before.epoch && after.offset > before.offset);

      await client.call("paint", [3, "red"]);
      await eventually(() => items.find("id", 3)?.color === "red", "a write after the migration");
      assert.ok((client.cursor?.offset ?? 0) > after.offset);
      assert.equal(sub.lastResumed, false); // no resubscribe: the update came as a transaction
    });
  });
}

describe("a query that stops compiling after a migration", () => {
  it("fails with SubscriptionError naming the change; the other set stays live", async () => {
    const server = await shop(V2);
    const client = await open(server);
    await client.call("put_items", [0, 3]);
    const items = client.subscribe(["SELECT * FROM item"]);
    const presence = client.subscribe(["SELECT * FROM syncd_connection"]);
    await Promise.all([items.applied, presence.applied]);
    const failures: Error[] = [];
    items.onError((e) => failures.push(e));

    await restartWith(server, V3);
    await eventually(() => failures.length === 1, "the item set fails", 15_000);
    const error = failures[0];
    assert.ok(error instanceof SubscriptionError);
    assert.match(error.message, /unknown table item/);
    assert.match(error.message, /the schema changed since your cursor \(version 1, now 2\): table item was made private in schema version 2/);
    assert.equal(client.table<Item>("item").count(), 0);
    assert.equal(client.schemaVersion, 2); // a fresh directory started with v2 is version 1
    await eventually(() => client.table("syncd_connection").count() > 0 && client.connected, "the other set resumed");
  });
});

describe("stale bindings", () => {
  it("connect rejects with StaleBindingsError listing what matters; additions do not matter", async () => {
    const server = await shop(V2);
    const v2 = (await server.schema()) as SchemaJson;
    const older = JSON.parse(JSON.stringify(v2)) as SchemaJson;
    const item = older.tables.find((t) => t.name === "item");
    assert.ok(item !== undefined);
    item.columns.push({ name: "weight", type: { kind: "i64" } });
    const price = item.columns.find((c) => c.name === "price");
    assert.ok(price !== undefined);
    price.type = { kind: "string" };
    older.reducers.push({ name: "discontinued", lifecycle: null, roles: null, params: [] });
    await assert.rejects(open(server, { bindings: older }), (e: unknown) => {
      assert.ok(e instanceof StaleBindingsError);
      assert.deepEqual(e.differences, [
        "column item.price changed type from string to i64",
        "column item.weight was removed",
        "reducer discontinued was removed",
      ]);
      assert.equal(e.schemaVersion, 1);
      return true;
    });

    const fewer = JSON.parse(JSON.stringify(v2)) as SchemaJson;
    fewer.reducers = fewer.reducers.filter((r) => r.name !== "paint");
    fewer.tables[0]?.columns.splice(1, 1);
    delete fewer.schema_version;
    const client = await open(server, { bindings: fewer });
    assert.equal(client.staleBindings, null);
    assert.deepEqual(staleDifferences(fewer, v2), []);
  });

  it("a migration that makes the bindings stale reaches onError and client.staleBindings", async () => {
    const server = await shop(V2);
    const bindings = (await server.schema()) as SchemaJson;
    delete bindings.schema_version; // as generated bindings have it
    const errors: Error[] = [];
    const client = await open(server, { bindings, onError: (e) => errors.push(e) });
    assert.equal(client.staleBindings, null);
    client.subscribe(["SELECT * FROM syncd_connection"]);

    await restartWith(server, V3);
    await eventually(() => client.staleBindings !== null, "the stale bindings are noticed", 15_000);
    const stale = client.staleBindings as StaleBindingsError | null;
    assert.ok(stale instanceof StaleBindingsError);
    assert.deepEqual(stale.differences, ["table item was removed (dropped, renamed or made private)"]);
    assert.equal(stale.schemaVersion, 2);
    assert.ok(errors.includes(stale));
    assert.equal(client.closed, false);
  });
});
