/** Reading a JWT's `exp` claim (RFC 7519 §4.1.4), to refresh a token before it expires. No verification: the server does that. */
import { base64Decode } from "./base64.js";

/** The token's expiry in ms since the epoch, or null if it is not a JWT or has no numeric `exp`. */
export function jwtExpiryMs(token: string | null | undefined): number | null {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3 || parts[1] === undefined) return null;
  try {
    const bytes = base64Decode(parts[1], true);
    // Latin-1 is enough to find a numeric claim, and keeps this free of TextDecoder (React Native).
    let text = "";
    for (const b of bytes) text += String.fromCharCode(b);
    const claims: unknown = JSON.parse(text);
    if (claims === null || typeof claims !== "object") return null;
    const exp = (claims as Record<string, unknown>).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** Refresh no more often than this, so a provider of very short-lived tokens is not called in a loop. */
export const MIN_REFRESH_INTERVAL_MS = 1_000;

/**
 * How long to wait before refreshing a token that expires at `expMs`: until half the time left,
 * but no more than a minute ahead of expiry; 0 if it is (nearly) expired already. With
 * `lastRefreshMs`, never sooner than {@link MIN_REFRESH_INTERVAL_MS} after the last refresh.
 */
export function refreshDelayMs(expMs: number, nowMs: number, lastRefreshMs: number | null = null): number {
  const left = expMs - nowMs;
  const lead = Math.min(60_000, Math.max(1_000, left / 2));
  const floor = lastRefreshMs === null ? 0 : lastRefreshMs + MIN_REFRESH_INTERVAL_MS - nowMs;
  return Math.max(0, floor, left - lead);
}
