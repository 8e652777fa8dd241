/**
 * A real `syncd serve` for integration tests: spawned from the repo's virtualenv (override with
 * SYNCD_PYTHON), on a free port (or a given one, to restart on the same port), with its data in a
 * temp dir; the address is parsed from its `syncd listening on http://HOST:PORT` line.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { decode } from "@msgpack/msgpack";
import WebSocket from "ws";
import type { WebSocketLike } from "../../src/types.js";

// build-test/test/integration -> the package root is three levels up.
export const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const REPO_ROOT = resolve(PACKAGE_ROOT, "..", "..");
export const PYTHON = resolve(PACKAGE_ROOT, process.env.SYNCD_PYTHON ?? "../../.venv/bin/python");
export const JWT_SECRET = "ts-client-test-secret-with-enough-entropy-0123456789";
const TIMEOUT_FACTOR = Number(process.env.SYNCD_TESTS_TIMEOUT_FACTOR ?? "1");
export const MS = TIMEOUT_FACTOR;

export class SyncdServer {
  readonly dataDir: string;
  private proc: ChildProcess | null = null;
  private output = "";
  host = "127.0.0.1";
  port = 0;

  constructor(public module = "schema/chat.py") {
    this.dataDir = mkdtempSync(join(tmpdir(), "syncd-ts-"));
  }

  get httpUrl(): string {
    return `http://${this.host}:${this.port}`;
  }

  get wsUrl(): string {
    return `ws://${this.host}:${this.port}/v1/ws`;
  }

  /** Start (again, on the same port and data dir if it ran before). */
  async start(): Promise<void> {
    const args = ["-m", "syncd", "serve", this.module, "--host", "127.0.0.1", "--port", String(this.port), "--data", this.dataDir];
    args.push("--jwt-secret", JWT_SECRET, "--allow-anonymous", "--log-level", "warning");
    const proc = spawn(PYTHON, args, { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    this.output = "";
    await new Promise<void>((resolveStart, reject) => {
      const timer = setTimeout(() => reject(new Error(`syncd did not start in time:\n${this.output}`)), 20_000 * MS);
      const onData = (chunk: Buffer) => {
        this.output += chunk.toString();
        const match = /syncd listening on http:\/\/([^\s:]+):(\d+)/.exec(this.output);
        if (match) {
          clearTimeout(timer);
          this.host = match[1] as string;
          this.port = Number(match[2]);
          resolveStart();
        }
      };
      proc.stdout?.on("data", onData);
      proc.stderr?.on("data", onData);
      proc.on("error", (error) => {
        clearTimeout(timer);
        reject(new Error(`could not run ${PYTHON} (set SYNCD_PYTHON): ${error.message}`));
      });
      proc.on("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`syncd exited with ${code}:\n${this.output}`));
      });
    });
  }

  /** Kill the process outright (no graceful close frames) and wait for it to be gone. */
  async kill(): Promise<void> {
    const proc = this.proc;
    this.proc = null;
    if (proc === null || proc.exitCode !== null) return;
    await new Promise<void>((done) => {
      proc.once("exit", () => done());
      proc.kill("SIGKILL");
    });
  }

  async stop(): Promise<void> {
    await this.kill();
    rmSync(this.dataDir, { recursive: true, force: true });
  }

  async schema(): Promise<unknown> {
    const response = await fetch(`${this.httpUrl}/v1/schema`);
    return response.json();
  }
}

/** An HS256 access token like Supabase's, for `sub`, expiring in `ttlSeconds`. */
export function hs256Token(sub: string, ttlSeconds: number): string {
  const now = Math.floor(Date.now() / 1000);
  const part = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part({ iss: "https://example.supabase.co/auth/v1", sub, aud: "authenticated", role: "authenticated", iat: now, exp: now + ttlSeconds })}`;
  return `${body}.${createHmac("sha256", JWT_SECRET).update(body).digest("base64url")}`;
}

/**
 * A WebSocket for the client under test: the `ws` package's, wrapped so a test can cut the
 * network (`terminate`: no close frame, the client sees 1006), hold reconnects back (`Gate`),
 * or lose the next frame that carries a `ReducerResult` (the call ran but its answer is lost).
 */
export class Gate {
  open = true;
  loseNextResult = false;
  readonly sockets: TestSocket[] = [];

  get current(): TestSocket {
    const s = this.sockets.at(-1);
    if (s === undefined) throw new Error("no socket yet");
    return s;
  }

  /** A WebSocket constructor bound to this gate, to pass as `connect({ WebSocket })`. */
  get WebSocket(): new (url: string, protocols?: string | string[]) => WebSocketLike {
    const gate = this;
    return class extends TestSocket {
      constructor(url: string, protocols?: string | string[]) {
        super(gate, url, protocols);
      }
    };
  }
}

export class TestSocket implements WebSocketLike {
  private readonly inner: WebSocket;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;

  constructor(private readonly gate: Gate, url: string, protocols?: string | string[]) {
    // A closed gate sends the client to a port nobody listens on: the attempt fails at once.
    this.inner = new WebSocket(gate.open ? url : "ws://127.0.0.1:1/v1/ws", protocols);
    gate.sockets.push(this);
    this.inner.onopen = (ev) => this.onopen?.(ev);
    this.inner.onclose = (ev) => this.onclose?.({ code: ev.code, reason: ev.reason });
    this.inner.onerror = (ev) => this.onerror?.(ev);
    this.inner.onmessage = (ev) => {
      if (this.gate.loseNextResult && carriesResult(ev.data)) {
        this.gate.loseNextResult = false;
        this.terminate();
        return;
      }
      this.onmessage?.({ data: ev.data });
    };
  }

  get protocol(): string {
    return this.inner.protocol;
  }

  get readyState(): number {
    return this.inner.readyState;
  }

  get binaryType(): string {
    return this.inner.binaryType;
  }

  set binaryType(value: string) {
    this.inner.binaryType = value as "arraybuffer";
  }

  send(data: string | Uint8Array | ArrayBuffer): void {
    this.inner.send(data);
  }

  close(code?: number, reason?: string): void {
    this.inner.close(code, reason);
  }

  /** Cut the connection without a close frame, as a network failure would. */
  terminate(): void {
    this.inner.terminate();
  }
}

function carriesResult(data: unknown): boolean {
  let msg: unknown;
  if (typeof data === "string") msg = JSON.parse(data);
  else msg = decode(new Uint8Array(data as ArrayBuffer));
  const m = msg as { type?: string; messages?: Array<{ type?: string }> };
  return m.type === "result" || (m.type === "batch" && (m.messages ?? []).some((x) => x.type === "result"));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Wait until `predicate` holds, polling every 10 ms. */
export async function eventually(predicate: () => boolean, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs * MS;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}
