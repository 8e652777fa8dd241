/** The stores of `connect({ store })`: memory and IndexedDB (here on fake-indexeddb). */
import assert from "node:assert/strict";
import { it } from "node:test";
import { IDBFactory } from "fake-indexeddb";
import { indexedDbStore, memoryStore, type ClientStore, type SavedState } from "../../src/index.js";

const state: SavedState = {
  schema: { module: "m", tables: [], reducers: [] } as unknown as SavedState["schema"],
  token: "t",
  identity: "ab",
  cursor: { epoch: 1, offset: 7 },
  querySets: [{ querySetId: 1, queries: ["SELECT * FROM t"], holders: [{ queryIndex: 0, table: "t", rows: [{ id: 1, blob: new Uint8Array([1, 2]) }] }] }],
};

async function roundTrip(store: ClientStore): Promise<void> {
  assert.deepEqual(await store.load(), { state: null, writes: [] });
  await store.saveState(state);
  await store.addWrite({ id: "b", seq: 2, kind: "merge", table: "t", pk: 1, column: "c", op: [[ "w", 1, 0 ]] });
  await store.addWrite({ id: "a", seq: 1, kind: "call", reducer: "r", args: [1, "x"], idempotencyKey: "a" });
  const loaded = await store.load();
  assert.deepEqual(loaded.state, state, "bytes stay bytes");
  assert.ok(loaded.state?.querySets[0]?.holders[0]?.rows[0]?.blob instanceof Uint8Array);
  assert.deepEqual(loaded.writes.map((w) => w.id), ["a", "b"], "writes come back in seq order");
  await store.removeWrite("a");
  await store.removeWrite("missing");
  assert.deepEqual((await store.load()).writes.map((w) => w.id), ["b"]);
  // The caller's objects are not kept by reference: changing them changes nothing saved.
  state.querySets[0]?.queries.push("mutated");
  assert.deepEqual((await store.load()).state?.querySets[0]?.queries, ["SELECT * FROM t"]);
  state.querySets[0]?.queries.pop();
}

it("memoryStore keeps state and writes, copied", async () => {
  await roundTrip(memoryStore());
});

it("indexedDbStore keeps state and writes across a reopen", async () => {
  const factory = new IDBFactory();
  await roundTrip(indexedDbStore("app", factory as never));
  const reopened = await indexedDbStore("app", factory as never).load();
  assert.deepEqual(reopened.writes.map((w) => w.id), ["b"]);
  assert.equal(reopened.state?.cursor?.offset, 7);
});

it("indexedDbStore without indexedDB says so", () => {
  assert.throws(() => indexedDbStore("x"), /no indexedDB/);
});
