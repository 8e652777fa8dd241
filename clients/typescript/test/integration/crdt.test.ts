/** CRDT merges and the value mapping (LWW, Counter, Json, enum) against `syncd serve schema/kled.py`. */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { ReducerError, connect, type SyncdClient } from "../../src/index.js";
import { Gate, SyncdServer, eventually } from "./server.js";

interface Workspace {
  id: number;
  owner: string;
  name: string;
  created: number;
  settings: unknown;
  edits: number;
}
interface Member {
  id: number;
  workspace_id: number;
  identity: string;
  role: "owner" | "editor" | "viewer";
  joined: number;
}

const server = new SyncdServer("schema/kled.py");
const clients: SyncdClient[] = [];

before(() => server.start());
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await server.stop();
});

for (const format of ["msgpack", "json"] as const) {
  describe(`kled with ${format}`, () => {
    it("merges LWW and Counter cells and maps every value type", async () => {
      const c = await connect({ url: server.wsUrl, format, WebSocket: new Gate().WebSocket });
      clients.push(c);
      const workspaces = c.table<Workspace>("workspace");
      const sub = c.subscribe(["SELECT * FROM workspace WHERE owner = :sender", "SELECT * FROM member WHERE identity = :sender"]);
      await sub.applied;
      const created = await c.call<number>("create_workspace", [`home ${format}`]);
      const ws = workspaces.filter("owner", c.identity)[0];
      assert.ok(ws !== undefined);
      assert.equal(created.value, ws.id, "create_workspace returns the new workspace's id");
      assert.equal(ws.name, `home ${format}`, "LWW[str] arrives as its value");
      assert.equal(ws.edits, 0, "Counter arrives as its total");
      assert.deepEqual(ws.settings, {}, "Json arrives as a plain value");
      assert.equal(typeof ws.created, "number");
      const member = c.table<Member>("member").filter("workspace_id", ws.id)[0];
      assert.equal(member?.role, "owner", "enum arrives as its value");

      await c.increment("workspace", ws.id, "edits", 3);
      await c.increment("workspace", ws.id, "edits", -1);
      assert.equal(workspaces.find("id", ws.id)?.edits, 2);
      await c.setLww("workspace", ws.id, "name", "renamed");
      assert.equal(workspaces.find("id", ws.id)?.name, "renamed");
      await c.call("update_settings", [ws.id, { theme: "dark", panes: [1, 2] }]);
      assert.deepEqual(workspaces.find("id", ws.id)?.settings, { theme: "dark", panes: [1, 2] });

      // A merge that changes nothing commits nothing; a bad one is a CONSTRAINT error.
      const stale = await c.merge("workspace", ws.id, "name", ["old", 1, 0, "someone"]);
      assert.equal(stale.offset, null);
      await assert.rejects(c.merge("workspace", ws.id, "owner", ["x", 1, 0, "w"]), (e: unknown) => e instanceof ReducerError && e.code === 3003);
      await eventually(() => workspaces.find("id", ws.id)?.name === "renamed", "the name to stay");
    });
  });
}
