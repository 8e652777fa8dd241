import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  ConnectionError,
  InternalError,
  QueryError,
  ReducerError,
  SubscriptionError,
  SyncdError,
  CloseCode,
  ErrorCode,
  errorCodeName,
  isResumableClose,
  isRetryable,
} from "../../src/index.js";
import { reducerFailure } from "../../src/errors.js";

describe("errors", () => {
  it("types a failed call by its code's range", () => {
    const failed = reducerFailure("set_name", 3000, "names must not be empty", "k1");
    assert.ok(failed instanceof ReducerError && failed instanceof SyncdError && failed instanceof Error);
    assert.equal(failed.code, 3000);
    assert.equal(failed.codeName, "REDUCER_FAILED");
    assert.equal(failed.message, "names must not be empty");
    assert.equal((failed as ReducerError).reducer, "set_name");
    assert.equal(failed.name, "ReducerError");
    assert.equal(failed.retryable, false);

    const internal = reducerFailure("set_name", 5001, "journal down", "k1");
    assert.ok(internal instanceof InternalError && internal instanceof SyncdError);
    assert.ok(!(internal instanceof ReducerError));
    assert.equal((internal as InternalError).idempotencyKey, "k1");
    assert.equal(internal.retryable, true);

    const limited = reducerFailure("set_name", 2002, "slow down", null);
    assert.ok(limited instanceof ReducerError);
    assert.equal(limited.retryable, true);
  });

  it("classifies unknown codes by range (§9.1)", () => {
    assert.equal(errorCodeName(3999), "UNKNOWN");
    assert.equal(isRetryable(5999), true);
    assert.equal(isRetryable(2999), false);
    assert.equal(isRetryable(1999), false);
    assert.equal(isRetryable(ErrorCode.SERVER_FULL), true);
    assert.ok(isResumableClose(CloseCode.SERVER_FULL));
    assert.ok(reducerFailure("r", 5123, "?", null) instanceof InternalError);
  });

  it("gives every error class the SyncdError base and its own name", () => {
    for (const e of [
      new ConnectionError("gone", { closeCode: 4501 }),
      new SubscriptionError(3100, "bad", ["SELECT"]),
      new QueryError(3100, "bad", "SELECT"),
    ]) {
      assert.ok(e instanceof SyncdError);
      assert.equal(e.name, e.constructor.name);
    }
    const gone = new ConnectionError("gone", { closeCode: 4501, reason: "banned" });
    assert.equal(gone.closeCode, 4501);
    assert.equal(gone.code, null);
    assert.equal(gone.codeName, null);
  });
});
