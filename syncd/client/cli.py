"""Client commands of the `syncd` CLI: ``sql``, ``call`` and ``subscribe``.

`syncd.cli` adds them with `add_commands` when this module imports. Each one connects with
the Python client (so it is a real client: the module's ``client_connected`` and
``client_disconnected`` reducers run), prints JSON lines on stdout, and reports failures as
one line on stderr with exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from syncd.client.cache import CallbackHandle
from syncd.client.connection import Connection, connect
from syncd.client.schema import Row
from syncd.errors import SyncdError

__all__ = ["add_commands", "parse_arg"]

_URL_HELP = (
    "the server: ws://HOST:PORT or http://HOST:PORT (/v1/ws is added), or the full "
    "ws://HOST:PORT/v1/ws; wss:// and https:// for TLS"
)
_json = msgspec.json.Encoder()


def parse_arg(text: str) -> Any:
    """A reducer argument from the command line: JSON if it parses, else the text itself.

    ``3`` is an int, ``true`` a bool, ``null`` None, ``'"3"'`` the string "3", ``'[1, 2]'`` a
    list, and ``hello`` (not JSON) the string "hello".
    """
    try:
        return json.loads(text)
    except ValueError:
        return text


def _emit(obj: object) -> None:
    sys.stdout.write(_json.encode(obj).decode() + "\n")
    sys.stdout.flush()


def _fail(command: str, message: object) -> int:
    print(f"syncd {command}: {message}", file=sys.stderr, flush=True)
    return 1


def _run(
    command: str, args: argparse.Namespace, main: Callable[[], Coroutine[Any, Any, int]]
) -> int:
    # The client logs reconnects and server errors; the command reports what matters itself.
    logging.getLogger("syncd.client").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    try:
        return asyncio.run(main())
    except SyncdError as exc:
        return _fail(command, exc)
    except (ValueError, TypeError) as exc:  # e.g. an argument msgpack cannot carry
        return _fail(command, exc)


def _connect(args: argparse.Namespace, *, reconnect: bool) -> Any:
    return connect(args.url, token=args.token, reconnect=reconnect, fmt=args.fmt)


# -- sql -------------------------------------------------------------------------------------


def _sql(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with _connect(args, reconnect=False) as conn:
            rows = await conn.sql(args.query)
        for row in rows:
            _emit(row)
        return 0

    return _run("sql", args, main)


# -- call ------------------------------------------------------------------------------------


def _call(args: argparse.Namespace) -> int:
    values = [parse_arg(a) for a in args.args]

    async def main() -> int:
        async with _connect(args, reconnect=False) as conn:
            called = await conn.call(args.reducer, *values, idempotency_key=args.idempotency_key)
        answer: dict[str, Any] = {"ok": True, "offset": called.offset}
        if called.value is not None:
            answer["value"] = called.value
        _emit(answer)
        return 0

    return _run("call", args, main)


# -- subscribe -------------------------------------------------------------------------------


def _subscribe(args: argparse.Namespace) -> int:
    limit: int | None = args.num_updates
    if limit is not None and limit < 0:
        return _fail("subscribe", "--num-updates must be 0 or more")

    async def main() -> int:
        async with _connect(args, reconnect=not args.no_reconnect) as conn:
            await conn.subscribe(args.queries)
            for name in conn.db:
                for row in conn.db[name].rows():
                    _emit({"op": "insert", "table": name, "row": row, "initial": True})
            if limit == 0:
                return 0
            return await _follow(conn, limit)

    return _run("subscribe", args, main)


async def _follow(conn: Connection, limit: int | None) -> int:
    """Print every cache change; return after `limit` of them, or when the connection ends."""
    done = asyncio.get_running_loop().create_future()
    count = 0

    def printed() -> None:
        nonlocal count
        count += 1
        if limit is not None and count >= limit and not done.done():
            done.set_result(None)

    def on_insert(table: str) -> Callable[[Row], None]:
        def callback(row: Row) -> None:
            if not done.done():
                _emit({"op": "insert", "table": table, "row": row})
                printed()

        return callback

    def on_update(table: str) -> Callable[[Row, Row], None]:
        def callback(old: Row, new: Row) -> None:
            if not done.done():
                _emit({"op": "update", "table": table, "row": new, "old": old})
                printed()

        return callback

    def on_delete(table: str) -> Callable[[Row], None]:
        def callback(row: Row) -> None:
            if not done.done():
                _emit({"op": "delete", "table": table, "row": row})
                printed()

        return callback

    handles: list[CallbackHandle[Any]] = []
    for name in conn.db:
        table = conn.db[name]
        handles += [
            table.on_insert(on_insert(name)),
            table.on_update(on_update(name)),
            table.on_delete(on_delete(name)),
        ]
    closed = asyncio.ensure_future(conn.wait_closed())
    try:
        await asyncio.wait([done, closed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
        for handle in handles:
            handle.remove()
    if done.done():
        return 0
    reason = conn.close_reason or "no reason given"
    return _fail("subscribe", f"the connection closed ({conn.close_code}): {reason}")


# -- the parsers -----------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help=_URL_HELP)
    parser.add_argument(
        "--token", help="bearer token (API key or JWT); default: connect anonymously"
    )
    parser.add_argument(
        "--fmt",
        choices=("msgpack", "json"),
        default="msgpack",
        help="wire subprotocol (default msgpack; json is easier to read in a packet capture)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log the client's connection events"
    )


def add_commands(subparsers: Any) -> None:
    """Add ``sql``, ``call`` and ``subscribe`` to the `syncd` command's subparsers.

    Args:
        subparsers: what `argparse.ArgumentParser.add_subparsers` returned.
    """
    formatter = argparse.RawDescriptionHelpFormatter

    sql = subparsers.add_parser(
        "sql",
        help="run one SQL query and print the rows",
        description="Run one SELECT over the server's public tables (a one-off query: column "
        "lists, COUNT/SUM/MIN/MAX/AVG with GROUP BY, ORDER BY, LIMIT/OFFSET; EXPLAIN SELECT "
        "... says how it is indexed) and print each result row as a JSON object on its own "
        "line, keyed by result column name.",
        epilog="examples:\n"
        '  syncd sql ws://127.0.0.1:3000 "SELECT * FROM message WHERE id > 10"\n'
        '  syncd sql ws://127.0.0.1:3000 "SELECT sender, COUNT(*) FROM message GROUP BY sender"\n'
        "  syncd sql ws://127.0.0.1:3000 \"EXPLAIN SELECT * FROM message WHERE text LIKE 'a%%'\"",
        formatter_class=formatter,
    )
    _common(sql)
    sql.add_argument(
        "query",
        metavar="QUERY",
        help="[EXPLAIN] SELECT ... FROM table [WHERE ...] [GROUP BY ...] [ORDER BY ...] [LIMIT n]",
    )
    sql.set_defaults(func=_sql)

    call = subparsers.add_parser(
        "call",
        help="call a reducer",
        description='Call REDUCER with ARGS and print {"ok": true, "offset": N} once the '
        "transaction is durable. Each ARG is read as JSON when it parses (3, true, null, "
        '"[1, 2]", \'"quoted"\'), else taken as a plain string.',
        epilog="examples:\n"
        "  syncd call ws://127.0.0.1:3000 set_name alice\n"
        "  syncd call http://127.0.0.1:3000 send_message 'hello, world'",
        formatter_class=formatter,
    )
    _common(call)
    call.add_argument("reducer", metavar="REDUCER", help="the reducer's name")
    call.add_argument("args", metavar="ARG", nargs="*", help="an argument (JSON, or text)")
    call.add_argument(
        "--idempotency-key",
        help="run the call at most once per key (default: a fresh key for this call)",
    )
    call.set_defaults(func=_call)

    subscribe = subparsers.add_parser(
        "subscribe",
        help="subscribe to queries and print the rows and every change",
        description="Subscribe to one or more queries (one query set). Print the initial "
        'rows as {"op": "insert", "table": T, "row": {...}, "initial": true}, then every '
        'change: {"op": "insert"|"update"|"delete", "table": T, "row": {...}} (updates also '
        'carry "old"). Runs until interrupted, or until --num-updates changes were printed. '
        "Reconnects and resumes if the connection drops.",
        epilog="example:\n"
        '  syncd subscribe ws://127.0.0.1:3000 "SELECT * FROM message" --num-updates 10',
        formatter_class=formatter,
    )
    _common(subscribe)
    subscribe.add_argument("queries", metavar="QUERY", nargs="+", help="SELECT ...")
    subscribe.add_argument(
        "-n",
        "--num-updates",
        type=int,
        metavar="N",
        help="exit after printing N changes (0: print the initial rows and exit)",
    )
    subscribe.add_argument(
        "--no-reconnect", action="store_true", help="exit with status 1 if the connection drops"
    )
    subscribe.set_defaults(func=_subscribe)
