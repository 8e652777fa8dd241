import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { MIN_REFRESH_INTERVAL_MS, jwtExpiryMs, refreshDelayMs } from "../../src/jwt.js";

const jwt = (claims: object) => `e30.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.sig`;

describe("JWT expiry", () => {
  it("reads exp from a JWT, and nothing from other tokens", () => {
    assert.equal(jwtExpiryMs(jwt({ sub: "ü-ser", exp: 1_700_000_000 })), 1_700_000_000_000);
    assert.equal(jwtExpiryMs(jwt({ sub: "u" })), null);
    assert.equal(jwtExpiryMs(jwt({ exp: "soon" })), null);
    assert.equal(jwtExpiryMs("sk_live_abc"), null);
    assert.equal(jwtExpiryMs("anon.abc.sig"), null);
    assert.equal(jwtExpiryMs(null), null);
  });

  it("refreshes a minute ahead of a long-lived token and halfway through a short one", () => {
    assert.equal(refreshDelayMs(3_600_000, 0), 3_540_000);
    assert.equal(refreshDelayMs(20_000, 0), 10_000);
    assert.equal(refreshDelayMs(500, 0), 0, "an expiring token is refreshed at once");
    assert.equal(refreshDelayMs(-5_000, 0), 0);
    assert.equal(refreshDelayMs(500, 10_000, 9_800), MIN_REFRESH_INTERVAL_MS - 200, "but not again within a second");
    assert.equal(refreshDelayMs(3_600_000, 0, -100_000), 3_540_000);
  });
});
