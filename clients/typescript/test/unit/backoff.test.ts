import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Backoff } from "../../src/backoff.js";

describe("Backoff", () => {
  it("doubles the ceiling up to the cap", () => {
    const b = new Backoff({ baseMs: 500, capMs: 30_000, rand: () => 0.999999 });
    const delays = Array.from({ length: 10 }, () => b.next());
    const ceilings = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000];
    delays.forEach((d, i) => {
      assert.ok(d < (ceilings[i] as number) && d > (ceilings[i] as number) * 0.99, `delay ${i}: ${d}`);
    });
    assert.equal(b.attempt, 10);
  });

  it("jitters within [ceiling/2, ceiling)", () => {
    const low = new Backoff({ baseMs: 1000, rand: () => 0 });
    assert.equal(low.next(), 500);
    const values = new Set<number>();
    const b = new Backoff({ baseMs: 1000, capMs: 1000 });
    for (let i = 0; i < 200; i++) {
      const d = b.next();
      assert.ok(d >= 500 && d < 1000, String(d));
      values.add(Math.round(d));
    }
    assert.ok(values.size > 50, "delays are spread out, not in lockstep");
  });

  it("never exceeds the cap, even after very many attempts", () => {
    const b = new Backoff({ baseMs: 250, capMs: 10_000, rand: () => 0.9999 });
    for (let i = 0; i < 5000; i++) assert.ok(b.next() <= 10_000);
    assert.equal(b.ceiling(100_000), 10_000);
  });

  it("starts over after reset", () => {
    const b = new Backoff({ baseMs: 100, rand: () => 0 });
    b.next();
    b.next();
    b.next();
    b.reset();
    assert.equal(b.attempt, 0);
    assert.equal(b.next(), 50);
  });

  it("refuses nonsense parameters", () => {
    assert.throws(() => new Backoff({ baseMs: 0 }), RangeError);
    assert.throws(() => new Backoff({ baseMs: 100, capMs: 50 }), RangeError);
    assert.throws(() => new Backoff({ factor: 0.5 }), RangeError);
  });
});
