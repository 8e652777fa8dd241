import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { decode, encode } from "@msgpack/msgpack";
import { base64Decode, base64Encode } from "../../src/base64.js";
import { makeCodec, type ClientMessage } from "../../src/protocol.js";
import { ProtocolViolation } from "../../src/errors.js";
import { httpBase, schemaUrl, wsUrl } from "../../src/schema.js";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");

describe("codec", () => {
  it("encodes Ping exactly as docs/protocol.md §2.4 shows", () => {
    assert.equal(hex(makeCodec("msgpack").encode({ type: "ping", nonce: 7 }) as Uint8Array), "82a474797065a470696e67a56e6f6e636507");
    assert.equal(makeCodec("json").encode({ type: "ping", nonce: 7 }), '{"type":"ping","nonce":7}');
  });

  const call: ClientMessage = {
    type: "call",
    request_id: 13,
    reducer: "add_task",
    args: ["write the spec", 2, new Uint8Array([0, 1, 2]), null, { nested: [true, 1.5] }],
    idempotency_key: "c0ffee-13",
  };

  it("round-trips a call through MessagePack, bytes as bin", () => {
    const back = decode(makeCodec("msgpack").encode(call) as Uint8Array);
    assert.deepEqual(back, call);
  });

  it("round-trips a call through JSON, bytes as base64 (protocol §2.3)", () => {
    const text = makeCodec("json").encode(call) as string;
    const back = JSON.parse(text) as { args: unknown[] };
    assert.equal(back.args[2], "AAEC");
    assert.deepEqual({ ...back, args: [...back.args.slice(0, 2), base64Decode(back.args[2] as string), ...back.args.slice(3)] }, call);
  });

  it("writes integers beyond 32 bits as MessagePack ints, never floats", () => {
    const codec = makeCodec("msgpack");
    for (const n of [2 ** 32, 1_718_000_000_123, Number.MAX_SAFE_INTEGER, -(2 ** 40)]) {
      const bytes = codec.encode({ type: "ping", nonce: n }) as Uint8Array;
      const tag = bytes[bytes.length - 9];
      assert.ok(tag === 0xcf || tag === 0xd3, `${n}: tag ${tag?.toString(16)}`);
      assert.equal((decode(bytes) as { nonce: number }).nonce, n);
    }
    const merge = decode(codec.encode({ type: "merge", request_id: 1, table: "t", pk: 1, column: "c", op: ["v", 1_718_000_000_123, 0, "w"] }) as Uint8Array);
    assert.deepEqual((merge as { op: unknown[] }).op, ["v", 1_718_000_000_123, 0, "w"]);
    assert.equal((decode(codec.encode({ type: "ping", nonce: 1.5 } as ClientMessage) as Uint8Array) as { nonce: number }).nonce, 1.5);
  });

  it("leaves out absent optional fields", () => {
    const m = decode(makeCodec("msgpack").encode({ type: "hello", token: undefined }) as Uint8Array);
    assert.deepEqual(m, { type: "hello" });
  });

  it("sends bigints exactly in MessagePack and refuses unsafe ones in JSON", () => {
    const big = { type: "call", request_id: 1, reducer: "r", args: [2n ** 62n] } as ClientMessage;
    assert.deepEqual((decode(makeCodec("msgpack").encode(big) as Uint8Array, { useBigInt64: true }) as { args: unknown[] }).args, [2n ** 62n]);
    assert.throws(() => makeCodec("json").encode(big), RangeError);
    assert.equal(makeCodec("json").encode({ type: "call", request_id: 1, reducer: "r", args: [5n] }), '{"type":"call","request_id":1,"reducer":"r","args":[5]}');
  });

  const serverBatch = {
    type: "batch",
    messages: [
      { type: "tx", epoch: 1, offset: 4191, updates: [{ query_set_id: 1, query_index: 0, delta: { table: "task", updates: [[42, "c2", "spec", true, 2]] } }] },
      { type: "result", request_id: 13, ok: true, offset: 4191 },
    ],
  };
  const expected = [
    {
      type: "tx",
      epoch: 1,
      offset: 4191,
      updates: [{ query_set_id: 1, query_index: 0, delta: { table: "task", inserts: [], updates: [[42, "c2", "spec", true, 2]], deletes: [] } }],
    },
    { type: "result", request_id: 13, ok: true, offset: 4191, code: null, message: null, value: null },
  ];

  it("decodes a MessagePack Batch into its messages, defaults filled in", () => {
    const data = encode(serverBatch);
    assert.deepEqual(makeCodec("msgpack").decode(data.slice().buffer), expected);
    assert.deepEqual(makeCodec("msgpack").decode(data), expected);
  });

  it("decodes a JSON Batch, from text or UTF-8 bytes", () => {
    const text = JSON.stringify(serverBatch);
    assert.deepEqual(makeCodec("json").decode(text), expected);
    assert.deepEqual(makeCodec("json").decode(new TextEncoder().encode(text)), expected);
  });

  it("ignores unknown fields and refuses malformed messages", () => {
    const codec = makeCodec("json");
    assert.deepEqual(codec.decode('{"type":"pong","nonce":3,"future":1}'), [{ type: "pong", nonce: 3 }]);
    assert.throws(() => codec.decode('{"type":"pong"}'), ProtocolViolation);
    assert.throws(() => codec.decode('{"type":"telepathy"}'), ProtocolViolation);
    assert.throws(() => codec.decode("[1]"), ProtocolViolation);
    assert.throws(() => codec.decode('{"type":"batch","messages":[{"type":"batch","messages":[]}]}'), /nested/);
    assert.throws(() => makeCodec("msgpack").decode("text"), /text frame/);
    assert.throws(() => makeCodec("msgpack").decode(new Uint8Array([0xc1])), ProtocolViolation);
  });

  it("refuses an unknown format", () => {
    assert.throws(() => makeCodec("xml" as "json"), TypeError);
  });
});

describe("base64", () => {
  it("round-trips every length and byte value", () => {
    for (let n = 0; n < 70; n++) {
      const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 37 + n) & 255);
      const text = base64Encode(bytes);
      assert.equal(text, Buffer.from(bytes).toString("base64"));
      assert.deepEqual(base64Decode(text), bytes);
    }
  });

  it("reads URL-safe unpadded text only when asked, and refuses garbage", () => {
    assert.deepEqual(base64Decode("-_8", true), new Uint8Array([251, 255]));
    assert.throws(() => base64Decode("-_8="), TypeError);
    assert.throws(() => base64Decode("abc"), TypeError);
    assert.throws(() => base64Decode("a=bc"), TypeError);
  });
});

describe("URLs", () => {
  it("derives the schema URL from the WebSocket URL", () => {
    assert.equal(schemaUrl("ws://h:1/v1/ws"), "http://h:1/v1/schema");
    assert.equal(schemaUrl("wss://h/v1/ws?token=x"), "https://h/v1/schema");
    assert.equal(schemaUrl("http://h:1"), "http://h:1/v1/schema");
    assert.equal(httpBase("ws://h:1/prefix/v1/ws/"), "http://h:1/prefix");
    assert.equal(wsUrl("http://h:1"), "ws://h:1/v1/ws");
    assert.equal(wsUrl("https://h/v1/ws?token=x"), "wss://h/v1/ws?token=x");
    assert.throws(() => wsUrl("ftp://h"), TypeError);
  });
});
