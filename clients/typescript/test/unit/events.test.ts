import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ClientCache } from "../../src/cache.js";
import { ClientSchema } from "../../src/schema.js";
import type { SchemaJson } from "../../src/index.js";
import type { QueryUpdate } from "../../src/protocol.js";

const SCHEMA: SchemaJson = {
  module: "typing",
  tables: [
    {
      name: "typing",
      public: true,
      events: true,
      primary_key: "id",
      auto_inc: true,
      columns: [
        { name: "id", type: { kind: "i64" } },
        { name: "room", type: { kind: "string" } },
      ],
      indexes: [{ name: "room", columns: ["room"], kind: "hash", unique: false }],
    },
    {
      name: "message",
      public: true,
      primary_key: "id",
      auto_inc: true,
      columns: [
        { name: "id", type: { kind: "i64" } },
        { name: "text", type: { kind: "string" } },
      ],
      indexes: [],
    },
  ],
  reducers: [],
};

function qu(table: string, parts: Partial<QueryUpdate>): QueryUpdate {
  return { table, inserts: [], updates: [], deletes: [], ...parts };
}

describe("event tables", () => {
  it("fire onInsert for each delivered row, in order, and keep none", () => {
    const cache = new ClientCache(new ClientSchema(SCHEMA));
    const seen: string[] = [];
    const typing = cache.table("typing");
    typing.onInsert((r) => seen.push(`typing ${String(r.id)} ${String(r.room)}`));
    typing.onDelete((r) => seen.push(`typing gone ${String(r.id)}`));
    cache.table("message").onInsert((r) => seen.push(`message ${String(r.id)}`));
    assert.equal(new ClientSchema(SCHEMA).table("typing").events, true);
    assert.equal(new ClientSchema(SCHEMA).table("message").events, false);
    cache.batch(() => {
      cache.applyUpdate(1, 0, qu("typing", { inserts: [[1, "r"], [2, "r"]] }), false);
      cache.applyUpdate(1, 1, qu("message", { inserts: [[1, "hi"]] }), false);
    });
    // Callbacks run after the whole message; event rows in the order delivered.
    assert.deepEqual(seen.filter((e) => e.startsWith("typing")), ["typing 1 r", "typing 2 r"]);
    assert.deepEqual(seen.filter((e) => e.startsWith("message")), ["message 1"]);
    assert.equal(typing.count(), 0);
    assert.equal(typing.find("id", 1), undefined);
    assert.deepEqual(typing.filter("room", "r"), []);
    // The same key again fires again; a resume's full result and a dropped set fire nothing more.
    seen.length = 0;
    cache.batch(() => cache.applyUpdate(1, 0, qu("typing", { inserts: [[1, "again"]], deletes: [1] }), false));
    cache.batch(() => cache.replace(1, 0, qu("typing", {}), false));
    cache.batch(() => cache.dropSet(1));
    assert.deepEqual(seen, ["typing 1 again"]);
    assert.equal(typing.count(), 0);
  });
});
