import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ClientCache, keyOf, valuesEqual } from "../../src/cache.js";
import { ClientSchema } from "../../src/schema.js";
import type { QueryUpdate } from "../../src/protocol.js";
import { SCHEMA } from "./fixtures.js";

function qu(table: string, parts: Partial<QueryUpdate>): QueryUpdate {
  return { table, inserts: [], updates: [], deletes: [], ...parts };
}

function newCache() {
  const errors: unknown[] = [];
  const cache = new ClientCache(new ClientSchema(SCHEMA), (e) => errors.push(e));
  const events: string[] = [];
  const messages = cache.table("message");
  messages.onInsert((r) => events.push(`insert ${String(r.id)}`));
  messages.onUpdate((a, b) => events.push(`update ${String(a.id)} ${String(a.text)}->${String(b.text)}`));
  messages.onDelete((r) => events.push(`delete ${String(r.id)}`));
  return { cache, events, errors, messages };
}

const m = (id: number, sender = "s1", text = `t${id}`) => [id, sender, 1000 + id, text];

describe("cache reference counts", () => {
  it("keeps a row two query sets match until both drop it", () => {
    const { cache, events, messages } = newCache();
    cache.batch(() => cache.replace(1, 0, qu("message", { inserts: [m(1), m(2)] }), false));
    cache.batch(() => cache.replace(2, 0, qu("message", { inserts: [m(2), m(3)] }), false));
    assert.equal(messages.count(), 3);
    assert.equal((messages as unknown as { refCount(pk: unknown): number }).refCount(2), 2);
    cache.batch(() => cache.dropSet(1));
    assert.deepEqual(messages.rows().map((r) => r.id).sort(), [2, 3]);
    cache.batch(() => cache.dropSet(2));
    assert.equal(messages.count(), 0);
    assert.deepEqual(events, ["insert 1", "insert 2", "insert 3", "delete 1", "delete 2", "delete 3"]);
  });

  it("counts two queries of one set separately", () => {
    const { cache, messages } = newCache();
    cache.batch(() => {
      cache.replace(1, 0, qu("message", { inserts: [m(1)] }), false);
      cache.replace(1, 1, qu("message", { inserts: [m(1)] }), false);
    });
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { deletes: [1] }), false));
    assert.equal(messages.count(), 1, "still matched by query 1");
    cache.batch(() => cache.applyUpdate(1, 1, qu("message", { deletes: [1] }), false));
    assert.equal(messages.count(), 0);
  });

  it("ignores deletes of keys the query does not hold, and counts an upsert once", () => {
    const { cache, messages, events } = newCache();
    cache.batch(() => cache.replace(1, 0, qu("message", { inserts: [m(1)] }), false));
    cache.batch(() => cache.replace(2, 0, qu("message", { inserts: [m(1)] }), false));
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { deletes: [99, 7] }), false));
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { updates: [m(1, "s1", "again")] }), false));
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { deletes: [1] }), false));
    assert.equal(messages.count(), 1, "set 2 still holds it: the update did not count twice");
    assert.deepEqual(events, ["insert 1", "update 1 t1->again"]);
  });

  it("fires nothing for a row that moves from one query to another in one message", () => {
    const { cache, events, messages } = newCache();
    cache.batch(() => cache.replace(1, 0, qu("message", { inserts: [m(1)] }), false));
    const before = messages.find("id", 1);
    cache.batch(() => {
      cache.applyUpdate(1, 0, qu("message", { deletes: [1] }), false);
      cache.applyUpdate(1, 1, qu("message", { inserts: [m(1)] }), false);
    });
    assert.deepEqual(events, ["insert 1"]);
    assert.equal(messages.find("id", 1), before, "the same object stays in the cache");
  });

  it("shows the whole message to callbacks, never half of it", () => {
    const { cache, messages } = newCache();
    const seen: number[] = [];
    messages.onInsert(() => seen.push(messages.count()));
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { inserts: [m(1), m(2), m(3)] }), false));
    assert.deepEqual(seen, [3, 3, 3]);
  });

  it("reports a throwing callback and still runs the others", () => {
    const { cache, events, errors, messages } = newCache();
    messages.onInsert(() => {
      throw new Error("boom");
    });
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { inserts: [m(1)] }), false));
    assert.deepEqual(events, ["insert 1"]);
    assert.equal(errors.length, 1);
  });

  it("stops calling a callback once unsubscribed", () => {
    const { cache, messages } = newCache();
    let n = 0;
    const off = messages.onInsert(() => n++);
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { inserts: [m(1)] }), false));
    off();
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { inserts: [m(2)] }), false));
    assert.equal(n, 1);
  });
});

describe("cache indexes", () => {
  it("filters a non-unique index and follows updates of the indexed column", () => {
    const { cache, messages } = newCache();
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { inserts: [m(1, "a"), m(2, "a"), m(3, "b")] }), false));
    assert.deepEqual(messages.filter("sender", "a").map((r) => r.id).sort(), [1, 2]);
    assert.deepEqual(messages.filter("sent", 1003).map((r) => r.id), [3]);
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { updates: [m(2, "b")] }), false));
    assert.deepEqual(messages.filter("sender", "a").map((r) => r.id), [1]);
    assert.deepEqual(messages.filter("sender", "b").map((r) => r.id).sort(), [2, 3]);
    cache.batch(() => cache.applyUpdate(1, 0, qu("message", { deletes: [3] }), false));
    assert.deepEqual(messages.filter("sender", "b").map((r) => r.id), [2]);
    assert.deepEqual(messages.filter("sender", "nobody"), []);
    assert.deepEqual(messages.filter("id", 1).map((r) => r.id), [1], "the primary key filters too");
  });

  it("finds by primary key and by unique column, bytes keys included", () => {
    const cache = new ClientCache(new ClientSchema(SCHEMA));
    const blobs = cache.table("blob");
    const digest = new Uint8Array([0, 1, 254]);
    cache.batch(() => cache.applyUpdate(1, 0, qu("blob", { inserts: [[digest, "logo", null, "o1"]] }), false));
    assert.equal(blobs.find("digest", new Uint8Array([0, 1, 254]))?.slug, "logo");
    assert.equal(blobs.find("slug", "logo")?.digest, digest);
    assert.equal(blobs.find("slug", "nope"), undefined);
    // A multi-column index is kept on its first column.
    assert.equal(blobs.filter("owner", "o1").length, 1);
    cache.batch(() => cache.applyUpdate(1, 0, qu("blob", { deletes: [new Uint8Array([0, 1, 254])] }), false));
    assert.equal(blobs.count(), 0);
  });

  it("decodes base64 bytes by column type in JSON mode", () => {
    const cache = new ClientCache(new ClientSchema(SCHEMA));
    const blobs = cache.table("blob");
    cache.batch(() => cache.applyUpdate(1, 0, qu("blob", { inserts: [["AAH+", "logo", "aGk=", "o1"], ["AAI=", "icon", null, "o1"]] }), true));
    assert.deepEqual(blobs.find("slug", "logo")?.data, new Uint8Array([104, 105]));
    assert.equal(blobs.find("slug", "icon")?.data, null);
    cache.batch(() => cache.applyUpdate(1, 0, qu("blob", { deletes: ["AAH+"] }), true));
    assert.deepEqual(blobs.rows().map((r) => r.slug), ["icon"]);
  });

  it("refuses find on a non-unique column and filter on an unindexed one", () => {
    const { messages } = newCache();
    assert.throws(() => messages.find("sender", "a"), /neither the primary key nor a unique column/);
    assert.throws(() => messages.filter("text", "x"), /has no index/);
  });

  it("refuses a row whose width does not match the schema", () => {
    const { cache } = newCache();
    assert.throws(() => cache.batch(() => cache.applyUpdate(1, 0, qu("message", { inserts: [[1, "a"]] }), false)), /stale/);
  });
});

describe("snapshot replacing (resumed=false)", () => {
  it("emits only the difference and ends like a fresh client", () => {
    const { cache, events, messages } = newCache();
    cache.batch(() => cache.replace(1, 0, qu("message", { inserts: [m(1), m(2), m(3)] }), false));
    const kept = messages.find("id", 1);
    events.length = 0;
    // While away: 2 changed, 3 was deleted, 4 was added.
    cache.batch(() => cache.replace(1, 0, qu("message", { inserts: [m(1), m(2, "s1", "edited"), m(4)] }), false));
    assert.deepEqual(events.sort(), ["delete 3", "insert 4", "update 2 t2->edited"]);
    assert.equal(messages.find("id", 1), kept, "an unchanged row keeps its object (no flicker)");

    const fresh = new ClientCache(new ClientSchema(SCHEMA));
    fresh.batch(() => fresh.replace(7, 0, qu("message", { inserts: [m(1), m(2, "s1", "edited"), m(4)] }), false));
    assert.deepEqual(
      messages.rows().sort((a, b) => Number(a.id) - Number(b.id)),
      fresh.table("message").rows().sort((a, b) => Number(a.id) - Number(b.id)),
    );
    // The replaced set still counts exactly once per row.
    cache.batch(() => cache.dropSet(1));
    assert.equal(messages.count(), 0);
  });

  it("keeps rows another set holds when the snapshot drops them", () => {
    const { cache, events, messages } = newCache();
    cache.batch(() => cache.replace(1, 0, qu("message", { inserts: [m(1), m(2)] }), false));
    cache.batch(() => cache.replace(2, 0, qu("message", { inserts: [m(2)] }), false));
    events.length = 0;
    cache.batch(() => cache.replace(1, 0, qu("message", { inserts: [] }), false));
    assert.deepEqual(events, ["delete 1"]);
    assert.deepEqual(messages.rows().map((r) => r.id), [2]);
  });
});

describe("keys and equality", () => {
  it("tells keys of different types apart", () => {
    assert.notEqual(keyOf("1"), keyOf(1));
    assert.equal(keyOf(1), keyOf(1n));
    assert.notEqual(keyOf(true), keyOf("t"));
    assert.equal(keyOf(new Uint8Array([1, 2])), keyOf(new Uint8Array([1, 2])));
    assert.equal(keyOf({ b: 1, a: [2] }), keyOf({ a: [2], b: 1 }));
    assert.equal(keyOf(null), keyOf(undefined));
  });

  it("compares plain values deeply", () => {
    assert.ok(valuesEqual({ a: [1, { b: new Uint8Array([1]) }] }, { a: [1, { b: new Uint8Array([1]) }] }));
    assert.ok(!valuesEqual({ a: 1 }, { a: 1, b: undefined }));
    assert.ok(!valuesEqual([1, 2], [1, 2, 3]));
    assert.ok(!valuesEqual(new Uint8Array([1]), [1]));
  });
});
