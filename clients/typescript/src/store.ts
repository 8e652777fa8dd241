/**
 * Keeping a client's state across restarts (`connect({ store })`): the row cache, the live query
 * sets, the cursor, the token and every call and merge not answered yet.
 *
 * A `ClientStore` is pluggable: `indexedDbStore()` in browsers (a tab that reloads offline shows
 * its data at once and keeps its unsent writes), `memoryStore()` for tests and for Node apps that
 * bring their own persistence (wrap it, or implement the four methods over a file or a database).
 *
 * What the client guarantees (README.md, "Offline"): a write is saved before it is
 * sent and removed once the server answered it, so after a restart it is sent again with its
 * idempotency key and runs exactly once; rows are saved with the cursor they are at, never in
 * the middle of a resume.
 */
import type { Cursor } from "./protocol.js";
import type { SchemaJson } from "./schema.js";

/** A call or merge not answered yet. `id` is unique per write; `seq` orders them. */
export type SavedWrite =
  | { id: string; seq: number; kind: "call"; reducer: string; args: unknown[]; idempotencyKey: string }
  | { id: string; seq: number; kind: "merge"; table: string; pk: unknown; column: string; op: unknown };

/** One query set and the rows each of its queries returns. */
export interface SavedQuerySet {
  querySetId: number;
  queries: string[];
  holders: Array<{ queryIndex: number; table: string; rows: Array<Record<string, unknown>> }>;
}

/** The cache as saved: the schema its rows are of, who we are, and where the rows stand. */
export interface SavedState {
  schema: SchemaJson;
  token: string | null;
  identity: string | null;
  cursor: Cursor | null;
  querySets: SavedQuerySet[];
  /** `setLww`/`increment` state: the writer id, its clock, its Counter totals (cell id, p, n). */
  merges?: { writerId: string; ms: number; counter: number; totals: Array<[string, number, number]> };
}

export interface ClientStore {
  /** What was saved (null state: nothing yet), and the unsent writes in `seq` order. */
  load(): Promise<{ state: SavedState | null; writes: SavedWrite[] }>;
  /** Replace the saved state (atomically: a reader sees the old one or the new one). */
  saveState(state: SavedState): Promise<void>;
  /** Save a write before it is sent. */
  addWrite(write: SavedWrite): Promise<void>;
  /** The write was answered: forget it. */
  removeWrite(id: string): Promise<void>;
}

function copy<T>(value: T): T {
  return structuredClone(value);
}

/**
 * A store in memory: survives `close()` and a new `connect()` in the same process (tests, or a
 * Node app that saves `snapshot()` itself). Values are copied in and out, as a real store would.
 */
export function memoryStore(): ClientStore & { snapshot(): { state: SavedState | null; writes: SavedWrite[] } } {
  let state: SavedState | null = null;
  const writes = new Map<string, SavedWrite>();
  const snapshot = () => ({ state: copy(state), writes: [...writes.values()].sort((a, b) => a.seq - b.seq).map(copy) });
  return {
    snapshot,
    load: async () => snapshot(),
    saveState: async (s) => {
      state = copy(s);
    },
    addWrite: async (w) => {
      writes.set(w.id, copy(w));
    },
    removeWrite: async (id) => {
      writes.delete(id);
    },
  };
}

interface IdbRequestLike<T> {
  result: T;
  error: unknown;
  onsuccess: (() => void) | null;
  onerror: (() => void) | null;
}

interface IdbLike {
  open(name: string, version: number): IdbRequestLike<IdbDatabaseLike> & { onupgradeneeded: (() => void) | null };
}

interface IdbDatabaseLike {
  objectStoreNames: { contains(name: string): boolean };
  createObjectStore(name: string, options?: { keyPath?: string }): unknown;
  transaction(names: string[], mode: "readonly" | "readwrite"): IdbTransactionLike;
  close(): void;
}

interface IdbTransactionLike {
  objectStore(name: string): {
    get(key: string): IdbRequestLike<unknown>;
    getAll(): IdbRequestLike<unknown[]>;
    put(value: unknown, key?: string): IdbRequestLike<unknown>;
    delete(key: string): IdbRequestLike<unknown>;
  };
  oncomplete: (() => void) | null;
  onerror: (() => void) | null;
  onabort: (() => void) | null;
  error: unknown;
}

/**
 * A store in the browser's IndexedDB, database `name` (one per app and server). Rows are kept
 * by structured clone, so `Uint8Array` values stay bytes.
 */
export function indexedDbStore(name = "syncd", factory?: IdbLike): ClientStore {
  const idb = factory ?? (globalThis as { indexedDB?: IdbLike }).indexedDB;
  if (idb === undefined) throw new TypeError("indexedDbStore: no indexedDB here (use memoryStore() or your own ClientStore)");
  let opened: Promise<IdbDatabaseLike> | null = null;
  const db = (): Promise<IdbDatabaseLike> => {
    opened ??= new Promise<IdbDatabaseLike>((resolve, reject) => {
      const req = idb.open(name, 1);
      req.onupgradeneeded = () => {
        const d = req.result;
        if (!d.objectStoreNames.contains("state")) d.createObjectStore("state");
        if (!d.objectStoreNames.contains("writes")) d.createObjectStore("writes", { keyPath: "id" });
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
    return opened;
  };
  const run = async <T>(mode: "readonly" | "readwrite", fn: (tx: IdbTransactionLike) => IdbRequestLike<T> | null): Promise<T | null> => {
    const d = await db();
    return new Promise<T | null>((resolve, reject) => {
      const tx = d.transaction(["state", "writes"], mode);
      const req = fn(tx);
      tx.oncomplete = () => resolve(req === null ? null : req.result);
      tx.onerror = tx.onabort = () => reject(tx.error);
    });
  };
  return {
    load: async () => {
      const state = (await run("readonly", (tx) => tx.objectStore("state").get("state"))) as SavedState | undefined | null;
      const writes = ((await run("readonly", (tx) => tx.objectStore("writes").getAll())) ?? []) as SavedWrite[];
      return { state: state ?? null, writes: writes.sort((a, b) => a.seq - b.seq) };
    },
    saveState: async (state) => {
      await run("readwrite", (tx) => tx.objectStore("state").put(state, "state"));
    },
    addWrite: async (write) => {
      await run("readwrite", (tx) => tx.objectStore("writes").put(write));
    },
    removeWrite: async (id) => {
      await run("readwrite", (tx) => tx.objectStore("writes").delete(id));
    },
  };
}
