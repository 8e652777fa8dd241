// End-to-end test of the chat page in real headless Chromium (driven by tests/browser/).
//
//   node e2e/chat.e2e.mjs PAGE_URL SERVER_WS_URL ARTIFACTS_DIR
//
// PAGE_URL serves dist/ (index.html); SERVER_WS_URL is a `syncd serve schema/chat.py`. Two
// users (two browser contexts, so two localStorage tokens) chat; then the server goes away and
// comes back on the same port, and both pages must show that they resumed and keep working.
//
// The server restart is the caller's job, over a line protocol: this script prints `KILL` on
// stdout and waits for `KILLED` on stdin, then `START` and waits for `STARTED`. Everything
// else it says goes to stderr. Exit status 0 means every step passed.
//
// Environment: CHROMIUM (default /usr/bin/chromium), E2E_TIMEOUT_MS per step (default 15000).
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [pageUrl, serverUrl, artifacts] = process.argv.slice(2);
if (!pageUrl || !serverUrl || !artifacts) {
  console.error("usage: node e2e/chat.e2e.mjs PAGE_URL SERVER_WS_URL ARTIFACTS_DIR");
  process.exit(2);
}
const STEP_MS = Number(process.env.E2E_TIMEOUT_MS ?? 15000);
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

function log(message) {
  console.error(`e2e: ${message}`);
}

/** Ask the caller to do something to the server and wait until it says it is done. */
async function request(command, reply) {
  process.stdout.write(`${command}\n`);
  const timer = setTimeout(() => fail(new Error(`no ${reply} on stdin within 60 s`)), 60000);
  for (;;) {
    const { value, done } = await stdinLines.next();
    if (done) throw new Error(`stdin closed while waiting for ${reply}`);
    if (value.trim() === reply) break;
  }
  clearTimeout(timer);
}

const pageErrors = [];
let browser = null;
const pages = [];

async function fail(error) {
  console.error(`e2e: FAILED: ${error.stack ?? error}`);
  try {
    await mkdir(artifacts, { recursive: true });
    for (const [i, page] of pages.entries()) {
      const path = join(artifacts, `failure-${i + 1}.png`);
      await page.screenshot({ path, fullPage: true });
      console.error(`e2e: screenshot of page ${i + 1} at failure: ${path}`);
      console.error(`e2e: page ${i + 1} body: ${(await page.locator("body").innerText()).slice(0, 2000)}`);
    }
  } catch (screenshotError) {
    console.error(`e2e: (no failure screenshot: ${screenshotError})`);
  }
  await browser?.close().catch(() => {});
  process.exit(1);
}

async function openUser(label) {
  // A context per user: separate localStorage, so each page gets its own anonymous identity.
  const context = await browser.newContext({ viewport: { width: 900, height: 600 } });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on("pageerror", (error) => pageErrors.push(`${label}: ${error.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error") log(`${label} console error: ${msg.text()}`);
  });
  pages.push(page);
  const url = `${pageUrl}${pageUrl.includes("?") ? "&" : "?"}server=${encodeURIComponent(serverUrl)}`;
  await page.goto(url);
  await page.waitForSelector('body[data-ready="true"]');
  await waitStatus(page, "connected");
  return page;
}

async function waitStatus(page, state) {
  await page.waitForSelector(`#status[data-state="${state}"]`);
}

async function setName(page, name) {
  await page.fill("#name", name);
  await page.click("#name-form button");
}

async function send(page, text) {
  await page.fill("#text", text);
  await page.click("#message-form button");
}

/** Wait for a message from `who` with `text` on `page`. */
async function seeMessage(page, who, text) {
  await page
    .locator(".message", { has: page.locator(".who", { hasText: who }) })
    .filter({ has: page.locator(".text", { hasText: text }) })
    .waitFor();
}

async function messageTexts(page) {
  return page.locator(".message .text").allInnerTexts();
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function main() {
  browser = await chromium.launch({
    executablePath,
    headless: true,
    // Root in a container: Chromium's sandbox needs user namespaces it may not have.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  log(`chromium ${browser.version()}`);
  const alice = await openUser("alice");
  const bob = await openUser("bob");

  log("names and presence");
  await setName(alice, "Alice");
  await setName(bob, "Bob");
  await bob.locator("#users li", { hasText: "Alice" }).waitFor();
  await alice.locator("#users li", { hasText: "Bob" }).waitFor();

  log("a message from one page appears in the other");
  await send(alice, "hello from alice");
  await seeMessage(bob, "Alice", "hello from alice");
  await seeMessage(alice, "Alice", "hello from alice");
  // The box empties once the call's result arrives (just after the row itself).
  await alice.waitForFunction(() => document.querySelector("#text").value === "");

  const token = await alice.evaluate(() =>
    Object.entries(localStorage).find(([key]) => key.startsWith("syncd-web-demo:token:")),
  );
  check(token && token[1].startsWith("anon."), `no anonymous token in localStorage: ${token}`);

  log("the server goes away");
  await request("KILL", "KILLED");
  await waitStatus(alice, "reconnecting");
  await waitStatus(bob, "reconnecting");
  log("the server comes back on the same port");
  await request("START", "STARTED");
  await waitStatus(alice, "resumed");
  await waitStatus(bob, "resumed");

  log("both pages keep working after the resume");
  await send(bob, "still here after the restart");
  await seeMessage(alice, "Bob", "still here after the restart");
  await seeMessage(bob, "Bob", "still here after the restart");
  await send(alice, "me too");
  await seeMessage(bob, "Alice", "me too");
  // Each page gets the row on its own connection: wait for both before comparing the lists
  // (checking alice right after bob saw it raced her own copy of the row).
  await seeMessage(alice, "Alice", "me too");
  for (const [label, page] of [["alice", alice], ["bob", bob]]) {
    const texts = await messageTexts(page);
    check(
      JSON.stringify(texts) ===
        JSON.stringify(["hello from alice", "still here after the restart", "me too"]),
      `${label} shows ${JSON.stringify(texts)} (lost or duplicated rows across the resume)`,
    );
  }
  await alice.locator("#users li", { hasText: "Bob" }).waitFor();
  check(pageErrors.length === 0, `uncaught errors in the pages: ${pageErrors.join("; ")}`);

  await mkdir(artifacts, { recursive: true });
  for (const [label, page] of [["alice", alice], ["bob", bob]]) {
    const path = join(artifacts, `chat-${label}.png`);
    await page.screenshot({ path, fullPage: true });
    log(`screenshot: ${path}`);
  }
  await browser.close();
  process.stdout.write("PASSED\n");
  process.exit(0);
}

main().catch(fail);
