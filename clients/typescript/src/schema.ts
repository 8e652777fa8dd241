/**
 * The schema document served by `GET /v1/schema`, and what the client derives from it: column
 * order (rows travel as arrays), the primary key, indexes, and which columns hold bytes (the JSON
 * subprotocol carries bytes as base64 text, so the client decodes them by column type).
 */
import { base64Decode } from "./base64.js";
import { ProtocolViolation } from "./errors.js";

/** A column or parameter type, as `GET /v1/schema` describes it. */
export type ColumnType =
  | { kind: "bool" | "i64" | "f64" | "string" | "bytes" | "identity" | "timestamp" | "json" | "counter" }
  | { kind: "option"; inner: ColumnType }
  | { kind: "lww"; inner: ColumnType }
  | { kind: "enum"; name: string; values: Array<string | number> };

export interface ColumnSchema {
  name: string;
  type: ColumnType;
}

export interface IndexSchema {
  name: string;
  columns: string[];
  kind: "hash" | "ordered" | string;
  unique: boolean;
}

export interface TableSchema {
  name: string;
  public: boolean;
  /** An event table: its rows are delivered (to `onInsert`), never cached. Absent: false. */
  events?: boolean;
  primary_key: string;
  auto_inc: boolean;
  columns: ColumnSchema[];
  indexes: IndexSchema[];
}

export interface ParamSchema {
  name: string;
  type: ColumnType;
  optional: boolean;
}

export interface ReducerSchema {
  name: string;
  lifecycle: string | null;
  roles: string[] | null;
  params: ParamSchema[];
  /** The declared return type; absent when the reducer returns no value. */
  returns?: ColumnType;
}

/**
 * Exactly the JSON document of `GET /v1/schema`. `schema_version` is the server's stored schema
 * version (absent in generated bindings: it describes a server's data, not the module).
 */
export type SchemaJson = { module: string; tables: TableSchema[]; reducers: ReducerSchema[]; schema_version?: number | null };

/** Whether a column type's visible value is bytes (possibly optional, possibly an `LWW[bytes]`). */
export function isBytesType(type: ColumnType | undefined): boolean {
  let t = type;
  while (t !== undefined) {
    if (t.kind === "bytes") return true;
    if (t.kind !== "option" && t.kind !== "lww") return false;
    t = t.inner;
  }
  return false;
}

/** One table as the client uses it. Built once per schema. */
export class TableInfo {
  readonly name: string;
  /** Column names in wire order. */
  readonly columns: readonly string[];
  readonly primaryKey: string;
  readonly pkPosition: number;
  /** Positions of the columns whose values are bytes: decoded from base64 in JSON mode. */
  readonly bytesPositions: readonly number[];
  /** Columns with a unique index of their own (the primary key included): `find` accepts them. */
  readonly uniqueColumns: ReadonlySet<string>;
  /**
   * Columns the cache keeps an index on (`filter` accepts them): the primary key, every unique
   * column, and the first column of every declared index (hash or ordered, unique or not). A
   * multi-column index is kept as an index on its first column, which `filter` narrows further.
   */
  readonly indexedColumns: ReadonlySet<string>;
  /** An event table: each delivered row fires `onInsert` once; the cache never keeps one. */
  readonly events: boolean;

  constructor(table: TableSchema) {
    this.name = table.name;
    this.events = table.events === true;
    this.columns = table.columns.map((c) => c.name);
    this.primaryKey = table.primary_key;
    this.pkPosition = this.columns.indexOf(table.primary_key);
    if (this.pkPosition < 0) {
      throw new ProtocolViolation(`schema: table ${table.name} has no primary key column ${table.primary_key}`);
    }
    this.bytesPositions = table.columns.flatMap((c, i) => (isBytesType(c.type) ? [i] : []));
    const unique = new Set<string>([table.primary_key]);
    const indexed = new Set<string>([table.primary_key]);
    for (const index of table.indexes ?? []) {
      const first = index.columns[0];
      if (first === undefined) continue;
      if (!this.columns.includes(first)) {
        throw new ProtocolViolation(`schema: index ${index.name} of ${table.name} names no column ${first}`);
      }
      indexed.add(first);
      if (index.unique && index.columns.length === 1) unique.add(first);
    }
    this.uniqueColumns = unique;
    this.indexedColumns = indexed;
  }

  /**
   * A wire row as a plain object keyed by column name.
   *
   * @param base64Bytes the row came over JSON: decode bytes columns from base64 text.
   */
  row(values: unknown, base64Bytes: boolean): Record<string, unknown> {
    if (!Array.isArray(values) || values.length !== this.columns.length) {
      const got = Array.isArray(values) ? `${values.length} values` : typeof values;
      throw new ProtocolViolation(
        `a ${this.name} row has ${got}, the table ${this.columns.length} columns; is the client's schema stale?`,
      );
    }
    const row: Record<string, unknown> = {};
    for (let i = 0; i < this.columns.length; i++) {
      row[this.columns[i] as string] = values[i];
    }
    if (base64Bytes) {
      for (const i of this.bytesPositions) {
        const name = this.columns[i] as string;
        row[name] = decodeBytes(row[name]);
      }
    }
    return row;
  }

  /**
   * A one-off query's result row (a column list, aggregates, EXPLAIN) keyed by `columns`.
   * Over JSON a value under the name of one of the table's bytes columns is decoded from base64.
   */
  resultRow(columns: readonly string[], values: unknown, base64Bytes: boolean): Record<string, unknown> {
    if (!Array.isArray(values) || values.length !== columns.length) {
      const got = Array.isArray(values) ? `${values.length} values` : typeof values;
      throw new ProtocolViolation(`a one-off result row has ${got} for ${columns.length} columns`);
    }
    const row: Record<string, unknown> = {};
    columns.forEach((name, i) => {
      row[name] = values[i];
    });
    if (base64Bytes) {
      for (const i of this.bytesPositions) {
        const name = this.columns[i] as string;
        if (name in row && row[name] !== null) row[name] = decodeBytes(row[name]);
      }
    }
    return row;
  }

  /** A primary key from the wire (a delete), decoded as `row` decodes its column. */
  pk(value: unknown, base64Bytes: boolean): unknown {
    return base64Bytes && this.bytesPositions.includes(this.pkPosition) ? decodeBytes(value) : value;
  }
}

function decodeBytes(value: unknown): unknown {
  if (typeof value !== "string") return value;
  try {
    return base64Decode(value);
  } catch {
    throw new ProtocolViolation("expected base64 text for a bytes value");
  }
}

/** The public tables of a schema, by name. */
export class ClientSchema {
  readonly module: string;
  readonly tables: ReadonlyMap<string, TableInfo>;
  readonly json: SchemaJson;
  /** Reducers whose return type is bytes: over JSON their value is decoded from base64. */
  readonly bytesReducers: ReadonlySet<string>;

  constructor(json: SchemaJson) {
    if (json === null || typeof json !== "object" || !Array.isArray(json.tables)) {
      throw new ProtocolViolation("the schema document does not describe a syncd module");
    }
    this.json = json;
    this.module = String(json.module ?? "");
    const tables = new Map<string, TableInfo>();
    for (const table of json.tables) tables.set(table.name, new TableInfo(table));
    this.tables = tables;
    const reducers = Array.isArray(json.reducers) ? json.reducers : [];
    this.bytesReducers = new Set(reducers.filter((r) => isBytesType(r?.returns)).map((r) => r.name));
  }

  /** A reducer's returned value from the wire, bytes decoded from base64 when `base64Bytes`. */
  returnValue(reducer: string, value: unknown, base64Bytes: boolean): unknown {
    return base64Bytes && value !== null && this.bytesReducers.has(reducer) ? decodeBytes(value) : value;
  }

  table(name: string): TableInfo {
    const info = this.tables.get(name);
    if (info === undefined) {
      throw new ProtocolViolation(`no table named ${JSON.stringify(name)} in module ${this.module}; is the schema stale?`);
    }
    return info;
  }
}

/**
 * The HTTP URL of the schema, from the WebSocket URL: `ws://h:p/v1/ws` -> `http://h:p/v1/schema`
 * (`wss` -> `https`; `http(s)://h:p` and a bare `ws://h:p` work too).
 */
export function schemaUrl(wsUrl: string): string {
  return httpBase(wsUrl) + "/v1/schema";
}

/** `ws://h:p/v1/ws?x` -> `http://h:p` (path prefix before `/v1/ws` kept). */
export function httpBase(url: string): string {
  const match = /^(wss?|https?):\/\/([^/?#]+)([^?#]*)/i.exec(url);
  if (match === null) throw new TypeError(`not a ws://, wss://, http:// or https:// URL: ${url}`);
  const scheme = (match[1] as string).toLowerCase();
  const httpScheme = scheme === "ws" ? "http" : scheme === "wss" ? "https" : scheme;
  let path = (match[3] as string).replace(/\/+$/, "");
  if (path.endsWith("/v1/ws")) path = path.slice(0, -"/v1/ws".length);
  return `${httpScheme}://${match[2] as string}${path}`;
}

/** The WebSocket URL for any of the accepted URL forms: adds `/v1/ws` and maps http(s) to ws(s). */
export function wsUrl(url: string): string {
  const match = /^(wss?|https?):\/\/([^/?#]+)([^?#]*)(\?[^#]*)?/i.exec(url);
  if (match === null) throw new TypeError(`not a ws://, wss://, http:// or https:// URL: ${url}`);
  const scheme = (match[1] as string).toLowerCase();
  const ws = scheme === "http" ? "ws" : scheme === "https" ? "wss" : scheme;
  let path = (match[3] as string).replace(/\/+$/, "");
  if (!path.endsWith("/v1/ws")) path += "/v1/ws";
  return `${ws}://${match[2] as string}${path}${match[4] ?? ""}`;
}

function typeText(t: unknown): string {
  if (t === null || typeof t !== "object") return JSON.stringify(t) ?? "undefined";
  const type = t as { kind?: unknown; inner?: unknown; name?: unknown; values?: unknown };
  if (type.kind === "option") return `${typeText(type.inner)} | None`;
  if (type.kind === "lww") return `LWW[${typeText(type.inner)}]`;
  if (type.kind === "enum") {
    const values = Array.isArray(type.values) ? type.values.map((v) => (typeof v === "string" ? `'${v}'` : String(v))).join(", ") : "?";
    return `${String(type.name)}(${values})`;
  }
  return String(type.kind);
}

function byName<T>(items: unknown): Map<string, T> {
  const out = new Map<string, T>();
  if (!Array.isArray(items)) return out;
  for (const item of items) {
    if (item !== null && typeof item === "object" && typeof (item as { name?: unknown }).name === "string") {
      out.set((item as { name: string }).name, item as T);
    }
  }
  return out;
}

function sameJson(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (a === null || b === null || typeof a !== "object" || typeof b !== "object") return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a as object);
  const kb = Object.keys(b as object);
  if (ka.length !== kb.length) return false;
  return ka.every((k) => sameJson((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]));
}

function paramsText(params: ParamSchema[]): string {
  return "(" + params.map((p) => `${p.name}: ${typeText(p.type)}${p.optional ? "?" : ""}`).join(", ") + ")";
}

/**
 * What code written against schema `expected` (generated bindings' `schema`) would get wrong
 * against `actual` (the server's `GET /v1/schema`): one line per difference that matters, `[]`
 * when it keeps working. Matters: a table it knows that is gone (dropped, renamed or made
 * private), a column of it gone, a column's type changed (a widening too: `T -> T | None` brings
 * nulls its types do not allow), the primary key changed, a reducer gone, or a reducer's
 * parameters changed (a new optional one at the end is fine). Additions and column order never
 * matter (rows are decoded with the server's schema). The rules of the Python client's
 * `stale_differences` (syncd/client/schema.py), line for line.
 */
export function staleDifferences(expected: SchemaJson, actual: SchemaJson): string[] {
  const out: string[] = [];
  const nowTables = byName<TableSchema>(actual?.tables);
  for (const [name, table] of byName<TableSchema>(expected?.tables)) {
    const now = nowTables.get(name);
    if (now === undefined) {
      out.push(`table ${name} was removed (dropped, renamed or made private)`);
      continue;
    }
    const nowColumns = byName<ColumnSchema>(now.columns);
    for (const [column, col] of byName<ColumnSchema>(table.columns)) {
      const nowCol = nowColumns.get(column);
      if (nowCol === undefined) out.push(`column ${name}.${column} was removed`);
      else if (!sameJson(nowCol.type, col.type)) {
        out.push(`column ${name}.${column} changed type from ${typeText(col.type)} to ${typeText(nowCol.type)}`);
      }
    }
    if (table.primary_key !== now.primary_key) {
      out.push(`table ${name}: primary key changed from ${table.primary_key} to ${now.primary_key}`);
    }
  }
  const nowReducers = byName<ReducerSchema>(actual?.reducers);
  for (const [name, reducer] of byName<ReducerSchema>(expected?.reducers)) {
    const now = nowReducers.get(name);
    if (now === undefined) {
      out.push(`reducer ${name} was removed`);
      continue;
    }
    const was = (Array.isArray(reducer.params) ? reducer.params : []).filter((p) => p !== null && typeof p === "object");
    const params = (Array.isArray(now.params) ? now.params : []).filter((p) => p !== null && typeof p === "object");
    const samePrefix = was.every((p, i) => i < params.length && sameJson(p, params[i]));
    const extraRequired = params.slice(was.length).some((p) => !p.optional);
    if (!samePrefix || extraRequired) {
      out.push(`reducer ${name}: parameters changed from ${paramsText(was)} to ${paramsText(params)}`);
    }
  }
  return out;
}
