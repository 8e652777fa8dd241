/**
 * The client row cache of docs/protocol.md §7.
 *
 * Per table: primary key -> row, a reference count per row, and hash indexes on the columns the
 * schema indexes. Per `(query_set_id, query_index)`: the keys that query contributes. A row's
 * count is the number of those key sets holding its key; it leaves the cache when that reaches 0,
 * so a row two subscriptions match stays until both drop it.
 *
 * Changes are applied inside `batch(fn)`, one WebSocket message at a time. Callbacks run only after
 * the whole message was applied, and only for net changes: a row that left one query and entered
 * another fires nothing, and a row stored again with equal values keeps its old object and fires
 * nothing (so a resume that falls back to a snapshot does not make rows flicker).
 */
import type { ClientSchema, TableInfo } from "./schema.js";
import type { QueryUpdate } from "./protocol.js";
import type { TableCache } from "./types.js";

export type Row = Record<string, unknown>;

/** A canonical string for a key or indexed value, so that Maps compare by value (bytes included). */
export function keyOf(value: unknown): string {
  switch (typeof value) {
    case "string":
      return "s" + value;
    case "number":
    case "bigint":
      return "n" + String(value);
    case "boolean":
      return value ? "t" : "f";
    case "undefined":
      return "z";
    default:
      if (value === null) return "z";
      if (value instanceof Uint8Array) {
        let hex = "b";
        for (const b of value) hex += (b < 16 ? "0" : "") + b.toString(16);
        return hex;
      }
      return "j" + stableStringify(value);
  }
}

function stableStringify(value: unknown): string {
  if (value === null || typeof value !== "object") return typeof value === "bigint" ? String(value) : JSON.stringify(value) ?? "null";
  if (value instanceof Uint8Array) return keyOf(value);
  if (Array.isArray(value)) return "[" + value.map(stableStringify).join(",") + "]";
  const obj = value as Record<string, unknown>;
  return "{" + Object.keys(obj).sort().map((k) => JSON.stringify(k) + ":" + stableStringify(obj[k])).join(",") + "}";
}

/** Deep equality of plain values: what the wire can carry (numbers, strings, bytes, arrays, maps). */
export function valuesEqual(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) {
    return typeof a === "number" && typeof b === "number" && Number.isNaN(a) && Number.isNaN(b);
  }
  if (a instanceof Uint8Array || b instanceof Uint8Array) {
    if (!(a instanceof Uint8Array && b instanceof Uint8Array) || a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
    return true;
  }
  if (Array.isArray(a) || Array.isArray(b)) {
    if (!(Array.isArray(a) && Array.isArray(b)) || a.length !== b.length) return false;
    return a.every((v, i) => valuesEqual(v, b[i]));
  }
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  const bm = b as Record<string, unknown>;
  const am = a as Record<string, unknown>;
  return ka.every((k) => Object.prototype.hasOwnProperty.call(bm, k) && valuesEqual(am[k], bm[k]));
}

type Listener<A extends unknown[]> = (...args: A) => void;

class Listeners<A extends unknown[]> {
  private readonly set = new Set<Listener<A>>();

  add(cb: Listener<A>): () => void {
    // Wrap, so that adding the same function twice gives two independent subscriptions.
    const entry: Listener<A> = (...args) => cb(...args);
    this.set.add(entry);
    return () => {
      this.set.delete(entry);
    };
  }

  get size(): number {
    return this.set.size;
  }

  emit(report: (error: unknown) => void, ...args: A): void {
    for (const cb of [...this.set]) {
      try {
        cb(...args);
      } catch (error) {
        report(error);
      }
    }
  }
}

/** One table's rows, counts, indexes and callbacks. */
export class TableState<R extends object = Row> implements TableCache<R> {
  /** The table as the server's schema describes it (replaced when a migration changes it). */
  info: TableInfo;
  // Primary key (canonical) -> row.
  private readonly byKey = new Map<string, R>();
  // Primary key (canonical) -> how many (query set, query) key sets hold it.
  private readonly refs = new Map<string, number>();
  // Indexed column -> value (canonical) -> primary keys (canonical). The primary key needs none.
  private readonly indexes = new Map<string, Map<string, Set<string>>>();
  readonly inserted = new Listeners<[R]>();
  readonly updated = new Listeners<[R, R]>();
  readonly deleted = new Listeners<[R]>();
  // Rows as they were before the message being applied, for the keys it touched.
  private before: Map<string, R | undefined> | null = null;
  // Event rows the message being applied delivered, in order: fired, never kept.
  private events: R[] = [];

  constructor(info: TableInfo) {
    this.info = info;
    for (const column of info.indexedColumns) {
      if (column !== info.primaryKey) this.indexes.set(column, new Map());
    }
  }

  rows(): R[] {
    return [...this.byKey.values()];
  }

  /** @internal The row stored under a canonical key (for saving the cache). */
  rowByKey(key: string): R | undefined {
    return this.byKey.get(key);
  }

  /** The server's schema changed: take the new `info`, rebuilding the indexes it asks for. */
  setInfo(info: TableInfo): void {
    this.info = info;
    this.indexes.clear();
    for (const column of info.indexedColumns) {
      if (column !== info.primaryKey) this.indexes.set(column, new Map());
    }
    for (const [key, row] of this.byKey) this.index(key, row);
  }

  count(): number {
    return this.byKey.size;
  }

  find(column: string, value: unknown): R | undefined {
    if (column === this.info.primaryKey) return this.byKey.get(keyOf(value));
    if (!this.info.uniqueColumns.has(column)) {
      throw new TypeError(
        `${this.info.name}.find: ${column} is neither the primary key nor a unique column (unique: ${[...this.info.uniqueColumns].join(", ")}); use filter()`,
      );
    }
    const keys = this.indexes.get(column)?.get(keyOf(value));
    if (keys === undefined) return undefined;
    for (const key of keys) return this.byKey.get(key);
    return undefined;
  }

  filter(column: string, value: unknown): R[] {
    if (column === this.info.primaryKey) {
      const row = this.byKey.get(keyOf(value));
      return row === undefined ? [] : [row];
    }
    const index = this.indexes.get(column);
    if (index === undefined) {
      throw new TypeError(
        `${this.info.name}.filter: ${column} has no index (indexed: ${[...this.info.indexedColumns].join(", ")}); use rows().filter(...)`,
      );
    }
    const keys = index.get(keyOf(value));
    if (keys === undefined) return [];
    const out: R[] = [];
    for (const key of keys) {
      const row = this.byKey.get(key);
      if (row !== undefined) out.push(row);
    }
    return out;
  }

  onInsert(cb: (row: R) => void): () => void {
    return this.inserted.add(cb);
  }

  onUpdate(cb: (oldRow: R, newRow: R) => void): () => void {
    return this.updated.add(cb);
  }

  onDelete(cb: (row: R) => void): () => void {
    return this.deleted.add(cb);
  }

  /** How many key sets hold `key` (for tests and debugging). */
  refCount(pk: unknown): number {
    return this.refs.get(keyOf(pk)) ?? 0;
  }

  // --- mutation, only inside ClientCache.batch ---

  private remember(key: string): void {
    if (this.before === null) throw new Error("cache mutated outside a batch");
    if (!this.before.has(key)) this.before.set(key, this.byKey.get(key));
  }

  /** Store `row` under `key`, keeping the old object when the values are equal. */
  store(key: string, row: R): void {
    const old = this.byKey.get(key);
    if (old !== undefined && valuesEqual(old, row)) return;
    this.remember(key);
    // A row that left and came back within this message keeps its object, so it fires nothing.
    const prior = this.before?.get(key);
    const value = old === undefined && prior !== undefined && valuesEqual(prior, row) ? prior : row;
    if (old !== undefined) this.unindex(key, old);
    this.byKey.set(key, value);
    this.index(key, value);
  }

  /** An event row: `onInsert` fires for it at the end of the batch; it is not stored. */
  event(row: R): void {
    if (this.before === null) throw new Error("cache mutated outside a batch");
    this.events.push(row);
  }

  addRef(key: string): void {
    this.refs.set(key, (this.refs.get(key) ?? 0) + 1);
  }

  release(key: string): void {
    const n = (this.refs.get(key) ?? 0) - 1;
    if (n > 0) {
      this.refs.set(key, n);
      return;
    }
    this.refs.delete(key);
    const old = this.byKey.get(key);
    if (old === undefined) return;
    this.remember(key);
    this.unindex(key, old);
    this.byKey.delete(key);
  }

  private index(key: string, row: R): void {
    for (const [column, index] of this.indexes) {
      const v = keyOf((row as Record<string, unknown>)[column]);
      let keys = index.get(v);
      if (keys === undefined) index.set(v, (keys = new Set()));
      keys.add(key);
    }
  }

  private unindex(key: string, row: R): void {
    for (const [column, index] of this.indexes) {
      const v = keyOf((row as Record<string, unknown>)[column]);
      const keys = index.get(v);
      if (keys === undefined) continue;
      keys.delete(key);
      if (keys.size === 0) index.delete(v);
    }
  }

  startBatch(): void {
    this.before = new Map();
  }

  /** End the batch; returns the callbacks to run for its net changes. */
  endBatch(report: (error: unknown) => void): Array<() => void> {
    const before = this.before;
    this.before = null;
    const calls: Array<() => void> = [];
    if (before === null) return calls;
    for (const [key, old] of before) {
      const now = this.byKey.get(key);
      if (old === now) continue;
      if (old === undefined && now !== undefined) calls.push(() => this.inserted.emit(report, now));
      else if (old !== undefined && now === undefined) calls.push(() => this.deleted.emit(report, old));
      else if (old !== undefined && now !== undefined) calls.push(() => this.updated.emit(report, old, now));
    }
    for (const row of this.events) calls.push(() => this.inserted.emit(report, row));
    this.events = [];
    return calls;
  }
}

interface KeySet {
  table: TableState;
  keys: Set<string>;
}

/** All tables' rows plus the key sets of every (query set, query). */
export class ClientCache {
  private schema: ClientSchema;
  private readonly tableStates = new Map<string, TableState>();
  // `${query_set_id}:${query_index}` -> the keys that query contributes.
  private readonly keySets = new Map<string, KeySet>();
  // Query set id -> how many queries it has key sets for (to drop a whole set).
  private readonly setSizes = new Map<number, number>();
  private inBatch = false;
  private readonly report: (error: unknown) => void;

  constructor(schema: ClientSchema, report: (error: unknown) => void = () => {}) {
    this.schema = schema;
    this.report = report;
    for (const [name, info] of schema.tables) this.tableStates.set(name, new TableState(info));
  }

  /**
   * The server's schema changed (a migration): tables keep their state (rows, callbacks, the
   * handles the app holds) with the new `TableInfo`; new tables get one. A table the server no
   * longer lists keeps its state until its sets fail, which releases the rows. Outside a batch.
   */
  setSchema(schema: ClientSchema): void {
    this.schema = schema;
    for (const [name, info] of schema.tables) {
      const state = this.tableStates.get(name);
      if (state === undefined) this.tableStates.set(name, new TableState(info));
      else state.setInfo(info);
    }
  }

  table(name: string): TableState {
    const state = this.tableStates.get(name);
    if (state === undefined) this.schema.table(name); // throws a clear error
    return state as TableState;
  }

  /** Whether the cache holds key sets for `querySetId`. */
  hasSet(querySetId: number): boolean {
    return this.setSizes.has(querySetId);
  }

  /**
   * Run `fn` (which applies one WebSocket message) and then the callbacks for its net changes.
   * Nested calls join the outer batch.
   */
  batch(fn: () => void): void {
    if (this.inBatch) {
      fn();
      return;
    }
    this.inBatch = true;
    for (const t of this.tableStates.values()) t.startBatch();
    let calls: Array<() => void> = [];
    try {
      fn();
    } finally {
      for (const t of this.tableStates.values()) calls = calls.concat(t.endBatch(this.report));
      this.inBatch = false;
    }
    for (const call of calls) call();
  }

  private keySet(querySetId: number, queryIndex: number, table: TableState): KeySet {
    const id = `${querySetId}:${queryIndex}`;
    let ks = this.keySets.get(id);
    if (ks === undefined) {
      ks = { table, keys: new Set() };
      this.keySets.set(id, ks);
      this.setSizes.set(querySetId, Math.max(this.setSizes.get(querySetId) ?? 0, queryIndex + 1));
    } else if (ks.table !== table) {
      // The query now selects from another table (the schema changed): start it afresh.
      for (const key of ks.keys) ks.table.release(key);
      ks.table = table;
      ks.keys = new Set();
    }
    return ks;
  }

  /** Apply a `QueryUpdate` to `(s, i)`: deletes, then inserts, then updates (§7). */
  applyUpdate(querySetId: number, queryIndex: number, update: QueryUpdate, base64Bytes: boolean): void {
    const table = this.table(update.table);
    if (table.info.events) {
      this.deliver(table, update, base64Bytes);
      return;
    }
    const ks = this.keySet(querySetId, queryIndex, table);
    for (const pk of update.deletes) {
      const key = keyOf(table.info.pk(pk, base64Bytes));
      if (ks.keys.delete(key)) table.release(key);
    }
    for (const values of [update.inserts, update.updates]) {
      for (const wire of values) {
        const row = table.info.row(wire, base64Bytes);
        const key = keyOf(row[table.info.primaryKey]);
        table.store(key, row);
        if (!ks.keys.has(key)) {
          ks.keys.add(key);
          table.addRef(key);
        }
      }
    }
  }

  /**
   * Replace the key set of `(s, i)` with the rows of a snapshot (`SubscribeApplied` with `resumed`
   * false): rows that stay keep their count (and their object, if equal), rows that left are
   * released, new ones are added.
   */
  replace(querySetId: number, queryIndex: number, update: QueryUpdate, base64Bytes: boolean): void {
    const table = this.table(update.table);
    if (table.info.events) {
      this.deliver(table, update, base64Bytes);
      return;
    }
    const ks = this.keySet(querySetId, queryIndex, table);
    const fresh = new Set<string>();
    for (const wire of [...update.inserts, ...update.updates]) {
      const row = table.info.row(wire, base64Bytes);
      const key = keyOf(row[table.info.primaryKey]);
      table.store(key, row);
      fresh.add(key);
      if (!ks.keys.has(key)) table.addRef(key);
    }
    for (const key of ks.keys) {
      if (!fresh.has(key)) table.release(key);
    }
    ks.keys = fresh;
  }

  /** The rows of an event table's update: each fires `onInsert`, none is kept (no key set). */
  private deliver(table: TableState, update: QueryUpdate, base64Bytes: boolean): void {
    for (const wire of [...update.inserts, ...update.updates]) table.event(table.info.row(wire, base64Bytes));
  }

  /** Every query's rows, for saving the cache (`connect({ store })`). */
  dump(): Array<{ querySetId: number; queryIndex: number; table: string; rows: Row[] }> {
    const out: Array<{ querySetId: number; queryIndex: number; table: string; rows: Row[] }> = [];
    for (const [id, ks] of this.keySets) {
      const [querySetId, queryIndex] = id.split(":").map(Number) as [number, number];
      const rows: Row[] = [];
      for (const key of ks.keys) {
        const row = ks.table.rowByKey(key);
        if (row !== undefined) rows.push(row);
      }
      out.push({ querySetId, queryIndex, table: ks.table.info.name, rows });
    }
    return out;
  }

  /** Put saved rows back under `(s, i)` (a start from a store). Inside a batch. */
  restore(querySetId: number, queryIndex: number, tableName: string, rows: Row[]): void {
    const table = this.table(tableName);
    if (table.info.events) return;
    const ks = this.keySet(querySetId, queryIndex, table);
    for (const row of rows) {
      const key = keyOf(row[table.info.primaryKey]);
      table.store(key, row);
      if (!ks.keys.has(key)) {
        ks.keys.add(key);
        table.addRef(key);
      }
    }
  }

  /** Drop query indexes at or past `queryCount` of a set (a snapshot with fewer queries). */
  trimSet(querySetId: number, queryCount: number): void {
    const size = this.setSizes.get(querySetId) ?? 0;
    for (let i = queryCount; i < size; i++) this.dropKeySet(`${querySetId}:${i}`);
    if (size > queryCount) this.setSizes.set(querySetId, queryCount);
  }

  /** Remove all of a set's key sets, releasing its rows (§7: `Unsubscribed`, or a failed set). */
  dropSet(querySetId: number): void {
    const size = this.setSizes.get(querySetId);
    if (size === undefined) return;
    for (let i = 0; i < size; i++) this.dropKeySet(`${querySetId}:${i}`);
    this.setSizes.delete(querySetId);
  }

  private dropKeySet(id: string): void {
    const ks = this.keySets.get(id);
    if (ks === undefined) return;
    for (const key of ks.keys) ks.table.release(key);
    this.keySets.delete(id);
  }
}
