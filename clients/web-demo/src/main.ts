// The chat page: schema/chat.py through @syncd/client and the generated chat bindings.
//
// Open it as index.html?server=ws://127.0.0.1:3000/v1/ws. It signs in anonymously: the server
// mints an identity on the first visit, and the token is kept in localStorage (one per server),
// so a reload is the same user.
import { CloseCode, ConnectionError, type SubscriptionHandle } from "@syncd/client";
import {
  connectTyped,
  MessageTable,
  UserTable,
  type Bindings,
  type Message,
  type User,
} from "../../typescript/generated/chat/index.js";

type Status = "connecting" | "connected" | "reconnecting" | "resumed" | "reloaded" | "disconnected";

const RETRY_MS = 3000;

const params = new URLSearchParams(location.search);
const serverUrl = params.get("server") ?? `ws://${location.hostname || "127.0.0.1"}:3000/v1/ws`;
// A token is only good on the server that minted it.
const tokenKey = `syncd-web-demo:token:${serverUrl}`;

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (found === null) throw new Error(`index.html has no #${id}`);
  return found as T;
}

const statusEl = element<HTMLSpanElement>("status");
const meEl = element<HTMLSpanElement>("me");
const usersEl = element<HTMLUListElement>("users");
const messagesEl = element<HTMLOListElement>("messages");
const nameForm = element<HTMLFormElement>("name-form");
const nameInput = element<HTMLInputElement>("name");
const messageForm = element<HTMLFormElement>("message-form");
const textInput = element<HTMLInputElement>("text");
const errorEl = element<HTMLParagraphElement>("error");

let app: Bindings | null = null;
let subscription: SubscriptionHandle | null = null;
let renderQueued = false;

function setStatus(status: Status): void {
  statusEl.dataset.state = status;
  statusEl.textContent = status;
}

function showError(error: unknown): void {
  const message = error instanceof Error ? error.message : String(error);
  errorEl.textContent = message;
  errorEl.hidden = message === "";
}

function displayName(identity: string): string {
  return app?.db.user.findByIdentity(identity)?.name ?? identity.slice(0, 8);
}

function render(): void {
  renderQueued = false;
  if (app === null) return;
  const me = app.client.identity;
  const mine = me === null ? undefined : app.db.user.findByIdentity(me);
  meEl.textContent = me === null ? "" : `you are ${mine?.name ?? "anonymous"} (${me.slice(0, 8)})`;

  const online = app.db.user
    .rows()
    .filter((u: User) => u.online)
    .map((u: User) => ({ identity: u.identity, label: displayName(u.identity) }))
    .sort((a, b) => a.label.localeCompare(b.label));
  usersEl.replaceChildren(
    ...online.map(({ identity, label }) => {
      const li = document.createElement("li");
      li.dataset.identity = identity;
      li.textContent = identity === me ? `${label} (you)` : label;
      return li;
    }),
  );

  const atBottom = messagesEl.scrollTop + messagesEl.clientHeight >= messagesEl.scrollHeight - 4;
  const messages = app.db.message.rows().sort((a: Message, b: Message) => a.sent - b.sent || a.id - b.id);
  messagesEl.replaceChildren(
    ...messages.map((m: Message) => {
      const li = document.createElement("li");
      li.className = m.sender === me ? "message mine" : "message";
      li.dataset.id = String(m.id);
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = displayName(m.sender);
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = m.text;
      li.append(who, text);
      return li;
    }),
  );
  if (atBottom) messagesEl.scrollTop = messagesEl.scrollHeight;
}

// Many rows change in one transaction (and a resume replays several): draw once per turn.
function scheduleRender(): void {
  if (renderQueued) return;
  renderQueued = true;
  queueMicrotask(render);
}

// Back after a drop. The client sent its cursor and query sets in Hello; the server answers
// them right after Welcome, so once a ping comes back the subscription knows whether the
// server resumed it (only the missed transactions were sent) or reloaded its rows.
function reconnected(): void {
  const client = app?.client;
  if (client === undefined) return;
  client.ping().then(
    () => setStatus(subscription?.lastResumed === false ? "reloaded" : "resumed"),
    () => {}, // dropped again: onDisconnect has said so
  );
}

async function start(): Promise<void> {
  setStatus("connecting");
  const stored = localStorage.getItem(tokenKey);
  let bound: Bindings;
  try {
    bound = await connectTyped({
      url: serverUrl,
      token: stored,
      reconnect: { baseMs: 250, capMs: 4000 },
      onConnect: (info) => (info.reconnected ? reconnected() : setStatus("connected")),
      onDisconnect: (info) => setStatus(info.willReconnect ? "reconnecting" : "disconnected"),
      onError: (error) => showError(error),
    });
  } catch (error) {
    setStatus("disconnected");
    if (
      stored !== null &&
      error instanceof ConnectionError &&
      error.closeCode === CloseCode.UNAUTHORIZED
    ) {
      // The server no longer knows this token (its data was reset): start as a new user.
      localStorage.removeItem(tokenKey);
      return start();
    }
    showError(error);
    setTimeout(() => void start(), RETRY_MS);
    return;
  }
  app = bound;
  showError("");
  if (bound.client.token !== null) localStorage.setItem(tokenKey, bound.client.token);
  for (const table of [bound.db.user, bound.db.message]) {
    table.onInsert(scheduleRender);
    table.onUpdate(scheduleRender);
    table.onDelete(scheduleRender);
  }
  subscription = bound.client.subscribe([
    `SELECT * FROM ${UserTable.tableName}`,
    `SELECT * FROM ${MessageTable.tableName}`,
  ]);
  subscription.onError((error) => showError(error));
  await subscription.applied;
  const me = bound.client.identity;
  const myName = me === null ? null : bound.db.user.findByIdentity(me)?.name;
  if (myName) nameInput.value = myName;
  render();
  // For the end-to-end test and for poking around in the console.
  (window as unknown as { syncdDemo: Bindings }).syncdDemo = bound;
  document.body.dataset.ready = "true";
}

nameForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = nameInput.value.trim();
  if (app === null || name === "") return;
  app.reducers.setName(name).then(() => showError(""), showError);
});

messageForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = textInput.value;
  if (app === null || text.trim() === "") return;
  app.reducers.sendMessage(text).then(() => {
    showError("");
    if (textInput.value === text) textInput.value = "";
  }, showError);
});

void start();
