/** `staleDifferences`: what matters between generated bindings' schema and the server's. */
import assert from "node:assert/strict";
import { it } from "node:test";
import { staleDifferences, type SchemaJson } from "../../src/index.js";

const DOC: SchemaJson = {
  module: "m",
  tables: [{ name: "item", public: true, primary_key: "id", auto_inc: false, indexes: [], columns: [{ name: "id", type: { kind: "i64" } }, { name: "name", type: { kind: "string" } }] }],
  reducers: [{ name: "put", lifecycle: null, roles: null, params: [{ name: "n", type: { kind: "i64" }, optional: false }] }],
};

function changed(edit: (d: SchemaJson) => void): SchemaJson {
  const doc = JSON.parse(JSON.stringify(DOC)) as SchemaJson;
  edit(doc);
  return doc;
}

it("additions, reordering and a trailing optional parameter do not matter", () => {
  const grown = changed((d) => {
    d.tables[0]?.columns.unshift({ name: "color", type: { kind: "string" } });
    d.tables.push({ name: "other", public: true, primary_key: "k", auto_inc: false, indexes: [], columns: [] });
    d.reducers.push({ name: "more", lifecycle: null, roles: null, params: [] });
    d.reducers[0]?.params.push({ name: "x", type: { kind: "bool" }, optional: true });
    d.schema_version = 4;
  });
  assert.deepEqual(staleDifferences(DOC, grown), []);
});

it("names removed tables, columns and reducers, changed types and parameters", () => {
  assert.deepEqual(staleDifferences(DOC, changed((d) => (d.tables = []))), ["table item was removed (dropped, renamed or made private)"]);
  assert.deepEqual(staleDifferences(DOC, changed((d) => d.tables[0]?.columns.pop())), ["column item.name was removed"]);
  assert.deepEqual(
    staleDifferences(DOC, changed((d) => d.tables[0]?.columns[1] && (d.tables[0].columns[1].type = { kind: "option", inner: { kind: "string" } }))),
    ["column item.name changed type from string to string | None"],
  );
  assert.deepEqual(staleDifferences(DOC, changed((d) => d.tables[0] && (d.tables[0].primary_key = "name"))), ["table item: primary key changed from id to name"]);
  assert.deepEqual(staleDifferences(DOC, changed((d) => (d.reducers = []))), ["reducer put was removed"]);
  assert.deepEqual(
    staleDifferences(DOC, changed((d) => d.reducers[0]?.params.push({ name: "y", type: { kind: "i64" }, optional: false }))),
    ["reducer put: parameters changed from (n: i64) to (n: i64, y: i64)"],
  );
});

it("malformed documents never throw", () => {
  for (const junk of [{}, { tables: 3 }, { tables: [1, null, { name: 5 }] }, { reducers: "x" }, null]) {
    assert.deepEqual(staleDifferences(junk as unknown as SchemaJson, DOC), []);
    assert.ok(Array.isArray(staleDifferences(DOC, junk as unknown as SchemaJson)));
  }
});
