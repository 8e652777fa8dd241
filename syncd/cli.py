"""The `syncd` command. The only place that reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from syncd.config import AuthConfig, ClusterConfig, Config, Limits
from syncd.errors import ConfigError, SyncdError
from syncd.persist.pg_errors import check_dsn, explain

_LIMITS = Limits()
_CLUSTER = ClusterConfig()


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be 1 or more, got 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _loadtest(args: argparse.Namespace) -> int:
    from syncd.loadtest.report import check_plotting, table, write_json_lines, write_plots
    from syncd.loadtest.run import LoadtestError, Options, run
    from syncd.loadtest.scenario import ScenarioError, load_scenario
    from syncd.loadtest.worker import Auth

    try:
        if args.api_key and args.token_secret:
            raise LoadtestError("give --api-key or --token-secret, not both")
        scenario = load_scenario(args.scenario).with_overrides(
            connections=args.connections, duration=args.duration
        )
        report_dir = Path(args.report_dir) if args.report_dir else None
        if report_dir is not None:
            check_plotting()
            try:
                report_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LoadtestError(f"--report-dir {report_dir}: {exc.strerror}") from None
        json_out = Path(args.json_out) if args.json_out else None
        if json_out is not None and not json_out.parent.is_dir():
            raise LoadtestError(f"--json-out {json_out}: no directory {json_out.parent}")
        auth = Auth(
            api_key=args.api_key or None,
            token_secret=args.token_secret or None,
            issuer=args.token_issuer,
            audience=args.token_audience,
            ttl_s=scenario.duration + 3600,
        )
        options = Options(
            url=args.url,
            scenario=scenario,
            processes=args.processes,
            auth=auth,
            metrics_url=args.metrics_url or None,
        )
        report = run(options, progress=sys.stderr)
    except (ScenarioError, LoadtestError) as exc:
        print(f"syncd loadtest: {exc}", file=sys.stderr)
        return 2
    summary = report.summary()
    print(table(summary))
    if json_out is not None:
        write_json_lines(report, json_out)
    if report_dir is not None:
        (report_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_json_lines(report, report_dir / "intervals.jsonl")
        for path in write_plots(report, report_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from syncd.server.app import run

    limits = Limits(
        max_message_size=args.max_message_size,
        max_queries_per_connection=args.max_queries,
        max_initial_rows=args.max_initial_rows,
        max_query_terms=args.max_query_terms,
        max_connections_per_identity=args.max_connections_per_identity,
        max_connections=args.max_connections,
        max_anonymous_per_address=args.max_anonymous_per_address,
        max_outbound_bytes=args.max_outbound_bytes,
        write_timeout_s=args.write_timeout,
        resume_window=args.resume_window,
        calls_per_second=args.max_calls_per_second,
        anonymous_calls_per_address=args.max_anonymous_calls_per_address,
        anonymous_queries_per_address=args.max_anonymous_queries_per_address,
        call_burst=args.call_burst,
        queries_per_second=args.max_queries_per_second,
        max_header_bytes=args.max_header_bytes,
        header_timeout_s=args.header_timeout,
        max_query_bytes=args.max_query_bytes,
        max_query_cost=args.max_query_cost,
        reducer_budget_ms=args.reducer_budget_ms,
    )
    from syncd.server.admission import parse_networks

    for flag, value in (
        ("--write-timeout", args.write_timeout),
        ("--max-connections", args.max_connections),
        ("--max-anonymous-per-address", args.max_anonymous_per_address),
        ("--max-anonymous-calls-per-address", args.max_anonymous_calls_per_address),
        ("--max-anonymous-queries-per-address", args.max_anonymous_queries_per_address),
    ):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{flag} must be a number >= 0 (0: no limit), not {value}")
    trusted = [p for value in args.trusted_proxy or () for p in value.split(",") if p.strip()]
    parse_networks(trusted)  # fail at start on a typo, not on the first request
    config = Config(
        module=Path(args.module),
        host=args.host,
        port=args.port,
        data_dir=Path(args.data),
        adopt_schema=args.adopt_schema,
        auth=AuthConfig(
            supabase_url=args.supabase_url or None,
            jwt_secret=args.jwt_secret or None,
            audience=args.jwt_audience,
            allow_anonymous=args.allow_anonymous,
        ),
        snapshot_every=args.snapshot_every,
        held_queries_every_s=args.held_queries_every,
        retain_txs=args.retain_txs,
        limits=limits,
        replica_id=args.replica_id,
        trusted_proxies=tuple(trusted),
        cluster=ClusterConfig(
            postgres_url=args.postgres or None,
            redis_url=args.redis or None,
            advertise_url=args.advertise_url or None,
            lease_poll_s=args.lease_poll,
            lease_timeout_s=args.lease_timeout,
            heartbeat_lapse_s=args.heartbeat_lapse,
        ),
    )
    if config.cluster.redis_url and not config.cluster.postgres_url:
        raise ConfigError("--redis needs --postgres: replicas share the Postgres journal")
    if config.cluster.postgres_url:
        check_dsn(config.cluster.postgres_url)
    _make_data_dir(config.data_dir)
    run(config, log_level=args.log_level)
    return 0


def _make_data_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--data {path} is a file, not a directory: give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the data directory {path}: {exc.strerror} (give a --data this "
            "user may write)"
        ) from None


def _migrate(args: argparse.Namespace) -> int:
    import time

    from syncd.server.loader import load_module_schema
    from syncd.server.migrate import migrate, migrate_postgres

    schema = load_module_schema(Path(args.module))
    options: dict[str, Any] = {
        "dry_run": args.dry_run,
        "queries": list(args.query or ()),
        "adopt_schema": args.adopt_schema,
        "now_us": time.time_ns() // 1000,
    }
    if args.postgres:
        check_dsn(args.postgres)
        report = asyncio.run(migrate_postgres(schema, args.postgres, **options))
    else:
        report = asyncio.run(migrate(schema, Path(args.data), **options))
    print(report.diff)
    for table, count in sorted(report.rows.items()):
        print(f"  table {table}: {count} rows")
    for table, count in sorted(report.affected.items()):
        done = report.functions.get(table)
        how = (
            f"{done['changed']} changed, {done['deleted']} deleted by its migration function"
            if done is not None
            else "read under the new layout"
            if table in report.rows
            else "lost (dropped)"
        )
        print(f"  rows affected in {table}: {count} ({how})")
    for table, index, count in report.indexes:
        print(f"  index to build: {table}.{index} over {count} rows")
    now_us = options["now_us"]

    def ago(us: int) -> str:
        return f"{max(0, now_us - us) / 1e6:.0f} s ago"

    for source in report.held:
        if source.error is not None:
            print(f"  held queries of {source.server}: not read ({source.error})")
            continue
        cut = " (truncated: the most held first)" if source.truncated else ""
        print(
            f"  held queries of {source.server}: {source.queries}{cut}, recorded "
            f"{ago(source.written_us)} under schema version {source.schema_version}"
        )
    if not report.held:
        print("  held queries: none recorded (no server has recorded its clients' queries)")
    for check in report.queries:
        verdict = "compiles" if check.error is None else f"stops compiling: {check.error}"
        where = []
        if check.given:
            where.append("given")
        if check.held:
            assert check.recorded_us is not None
            role = "" if check.restricted else ", by a service role"
            when = ago(check.recorded_us)
            where.append(f"held by clients: {check.holders} query sets{role}, recorded {when}")
        print(f"  query {check.sql!r} ({'; '.join(where)}): {verdict}")
    summary = {
        "kind": report.kind,
        "from": report.version_from,
        "to": report.version_to,
        "dry_run": args.dry_run,
        "migration_offset": report.applied_offset,
        "rows": report.rows,
        "rows_affected": report.affected,
        "indexes_to_build": [[t, i] for t, i, _ in report.indexes],
        "functions": report.functions,
        "broken_queries": [c.sql for c in report.queries if c.error is not None],
        "held_queries": len([c for c in report.queries if c.held]),
    }
    print(json.dumps(summary))
    return 1 if summary["broken_queries"] else 0


def _backup(args: argparse.Namespace) -> int:
    from syncd.server.backup import backup

    info = backup(Path(args.data), Path(args.out))
    print(
        json.dumps(
            {"backup": args.out, "epoch": info.epoch, "offset": info.offset, "files": info.files}
        )
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from datetime import datetime

    from syncd.server.backup import restore
    from syncd.server.loader import load_module_schema

    at_micros = None
    if args.at_time:
        try:
            when = datetime.fromisoformat(args.at_time)
        except ValueError:
            raise ConfigError(f"--at-time: not an ISO 8601 time: {args.at_time!r}") from None
        if when.tzinfo is None:
            raise ConfigError("--at-time needs a time zone, e.g. 2026-11-28T12:00:00+00:00")
        at_micros = int(when.timestamp() * 1_000_000)
    schema = load_module_schema(Path(args.module))
    info = restore(
        schema,
        Path(args.backup),
        Path(args.data),
        at_offset=args.at_offset,
        at_micros=at_micros,
        adopt_schema=args.adopt_schema,
    )
    if info.source_live:
        print(
            f"syncd: note: {args.backup} is in use by a running server; restored a consistent "
            f"copy of it as of offset {info.source_offset}, and that server has gone on since "
            "(to take copies of a live server, use `syncd backup`)",
            file=sys.stderr,
        )
    point = info.point
    if point is not None and point.version < point.latest:
        module = f" (module {point.module!r})" if point.module else ""
        later = "".join(f"\n  + {what}" for what in point.later)
        print(
            f"syncd: note: offset {info.at} is before a migration of the source: it was "
            f"written under schema version {point.version}{module}; versions "
            f"{point.version + 1}..{point.latest}, which changed the following, are not "
            f"restored:{later}"
            + (
                ""
                if info.migration is not None
                else f"\nstart it with the module of version {point.version}{module} (identical), "
                "or with a later one (migrated automatically at its start)"
            ),
            file=sys.stderr,
        )
    if info.migration is not None:
        print(
            f"syncd: note: module {schema.module_name!r} is newer than the restored point; "
            f"the restore migrated it as a server's start would ({info.migration})",
            file=sys.stderr,
        )
    # What a server started on the new directory reports: /readyz epoch and offset, the rows
    # each table holds, and /v1/schema's schema_version.
    print(
        json.dumps(
            {
                "restored": args.data,
                "epoch": info.epoch,
                "offset": info.offset,
                "rows": info.rows,
                "at": info.at,
                "ended_connections": info.ended_connections,
                "schema_version": info.schema_version,
                "point_schema": None
                if point is None
                else {
                    "version": point.version,
                    "module": point.module,
                    "latest": point.latest,
                    "later": list(point.later),
                },
                "source": {
                    "path": args.backup,
                    "epoch": info.source_epoch,
                    "offset": info.source_offset,
                },
            }
        )
    )
    return 0


def _iso(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 in UTC, e.g. 2026-11-28T12:00:00+00:00."""
    if seconds is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="seconds")


def _keys_store(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    """(DSN, None) or (None, data directory): `--data`/`--postgres` given before or after the
    action; neither: SYNCD_POSTGRES_URL, else SYNCD_DATA, else ./syncd-data."""
    data = getattr(args, "data", None)
    dsn = getattr(args, "postgres", None)
    if data is not None and dsn is not None:
        raise ConfigError(
            "give --data (the keys of one server's data directory) or --postgres (those of "
            "replicas sharing a database), not both"
        )
    if data is None and dsn is None:
        dsn = os.environ.get("SYNCD_POSTGRES_URL") or None
        if dsn is None:
            data = os.environ.get("SYNCD_DATA", "syncd-data")
    if dsn is not None:
        check_dsn(dsn)
        return dsn, None
    assert data is not None
    path = Path(data)
    if not path.is_dir():
        raise ConfigError(
            f"no data directory {path}: give the --data of a server (`syncd serve` creates it), "
            "or --postgres DSN for replicas"
        )
    return None, path


def _keys(args: argparse.Namespace) -> int:
    from syncd.auth.apikey import ApiKey, ApiKeys, PostgresApiKeys

    def described(key: ApiKey) -> str:
        return json.dumps(
            {
                "key_id": key.key_id,
                "name": key.name,
                "role": key.role,
                "identity": key.identity,
                "created_at": _iso(key.created_at),
                "revoked_at": _iso(key.revoked_at),
            }
        )

    dsn, data = _keys_store(args)
    if dsn is not None:
        shared = PostgresApiKeys(dsn)

        async def run(command: str) -> Any:
            try:
                if command == "create":
                    return await shared.create(args.name, args.role)
                if command == "list":
                    return await shared.all()
                return await shared.revoke(args.key)
            finally:
                await shared.aclose()

        def act(command: str) -> Any:
            try:
                return asyncio.run(run(command))
            except SyncdError:
                raise
            except Exception as exc:
                explained = explain(exc, dsn)
                if explained is None:
                    raise
                raise ConfigError(f"cannot reach the API keys: {explained}") from exc
    else:
        assert data is not None
        local = ApiKeys(data)

        def act(command: str) -> Any:
            if command == "create":
                return local.create(args.name, args.role)
            if command == "list":
                return local.all()
            return local.revoke(args.key)

    if args.keys_command == "create":
        key, secret = act("create")
        print(described(key))
        print(secret)
        print("syncd keys: the secret above is shown only once; store it now", file=sys.stderr)
    elif args.keys_command == "list":
        for key in act("list"):
            print(described(key))
    else:
        revoked = act("revoke")
        if not revoked:
            print(f"syncd keys: no live key with id or name {args.key!r}", file=sys.stderr)
            return 1
        for key in revoked:
            print(json.dumps({"revoked": key.key_id, "name": key.name}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncd",
        description="syncd: a real-time state sync server (tables, reducers, SQL subscriptions).",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("SYNCD_DEBUG", "") not in ("", "0"),
        help="print the Python traceback of an error too (env SYNCD_DEBUG=1); without it an "
        "error is one or two lines saying what is wrong and what to do",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve a module's tables and reducers",
        description="Serve MODULE (a Python file declaring tables and reducers) over WebSockets "
        "at /v1/ws, with its data in an embedded journal.",
    )
    serve.add_argument("module", help="path of the module, e.g. schema/kled.py")
    serve.add_argument("--host", default=os.environ.get("SYNCD_HOST", "127.0.0.1"))
    serve.add_argument(
        "--port", type=int, default=int(os.environ.get("SYNCD_PORT", "3000")), help="0: any free"
    )
    serve.add_argument(
        "--data",
        default=os.environ.get("SYNCD_DATA", "syncd-data"),
        help="directory of the embedded journal (default ./syncd-data)",
    )
    serve.add_argument(
        "--supabase-url",
        default=os.environ.get("SYNCD_SUPABASE_URL"),
        help="accept this Supabase project's access tokens (JWKS, issuer <url>/auth/v1)",
    )
    serve.add_argument(
        "--jwt-secret",
        default=os.environ.get("SYNCD_JWT_SECRET"),
        help="accept HS256 tokens signed with this secret (Supabase's legacy JWT secret); "
        "prefer the SYNCD_JWT_SECRET environment variable",
    )
    serve.add_argument(
        "--jwt-audience", default=os.environ.get("SYNCD_JWT_AUDIENCE", "authenticated")
    )
    anonymous = serve.add_mutually_exclusive_group()
    anonymous.add_argument(
        "--allow-anonymous",
        dest="allow_anonymous",
        action="store_true",
        default=None,
        help="give clients without a token a server-minted identity (the default unless a "
        "Supabase URL or JWT secret is set)",
    )
    anonymous.add_argument(
        "--no-anonymous",
        dest="allow_anonymous",
        action="store_false",
        help="refuse clients without a token",
    )
    serve.add_argument("--snapshot-every", type=int, default=50_000, metavar="TXS")
    serve.add_argument(
        "--held-queries-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="record the queries clients hold (for `syncd migrate --dry-run`) in the journal at "
        "most this often, when they changed (0: never)",
    )
    serve.add_argument(
        "--adopt-schema",
        action="store_true",
        help="MODULE is exactly the module that wrote this data directory, which an earlier "
        "syncd wrote without storing schemas: record it (refused without this flag, since rows "
        "are positional and a swapped column would be misread)",
    )
    serve.add_argument(
        "--retain-txs",
        type=int,
        default=1_000_000,
        metavar="TXS",
        help="transactions kept in the journal before the latest snapshot (0: all); also how "
        "long idempotency keys are remembered",
    )
    serve.add_argument("--max-message-size", type=int, default=_LIMITS.max_message_size)
    serve.add_argument("--max-queries", type=int, default=_LIMITS.max_queries_per_connection)
    serve.add_argument("--max-initial-rows", type=int, default=_LIMITS.max_initial_rows)
    serve.add_argument("--max-query-terms", type=int, default=_LIMITS.max_query_terms)
    serve.add_argument(
        "--max-query-bytes",
        type=int,
        default=_LIMITS.max_query_bytes,
        metavar="BYTES",
        help="longest SQL text of one query (checked before parsing)",
    )
    serve.add_argument(
        "--max-query-cost",
        type=int,
        default=_LIMITS.max_query_cost,
        metavar="ROWS",
        help="most rows (times join partners) a subscription may examine initially or per "
        "transaction; more fails it with LIMIT_EXCEEDED (0: no limit)",
    )
    serve.add_argument(
        "--max-header-bytes",
        type=int,
        default=_LIMITS.max_header_bytes,
        metavar="BYTES",
        help="largest HTTP request head (request line + headers); more gets 431 or 414",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=_LIMITS.header_timeout_s,
        metavar="SECONDS",
        help="longest time an HTTP request head (or a /v1 request body) may take; then 408",
    )
    serve.add_argument(
        "--max-connections-per-identity",
        type=int,
        default=_LIMITS.max_connections_per_identity,
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=_LIMITS.max_connections,
        metavar="N",
        help="WebSocket connections this server holds at once; more are refused with close "
        "4004 (SERVER_FULL); lowered to fit the open-file limit (0: only that limit)",
    )
    serve.add_argument(
        "--max-anonymous-per-address",
        type=int,
        default=_LIMITS.max_anonymous_per_address,
        metavar="N",
        help="connections one client address (IPv6: /64) may hold while anonymous or not "
        "signed in yet; more are refused with close 4501 (0: no limit)",
    )
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        default=[p for p in os.environ.get("SYNCD_TRUSTED_PROXIES", "").split(",") if p],
        metavar="CIDR",
        help="a reverse proxy whose X-Forwarded-For is believed (repeatable; env "
        "SYNCD_TRUSTED_PROXIES, comma-separated); default none: the TCP peer is the client",
    )
    serve.add_argument(
        "--max-outbound-bytes",
        type=int,
        default=_LIMITS.max_outbound_bytes,
        help="bytes queued for one client before it is closed as a slow consumer (4001)",
    )
    serve.add_argument(
        "--write-timeout",
        type=float,
        default=_LIMITS.write_timeout_s,
        metavar="SECONDS",
        help="a client whose socket takes no data for this long is closed as a slow consumer "
        "(4001), and reset if it does not take the close within as long again (0: no deadline)",
    )
    serve.add_argument(
        "--max-calls-per-second",
        type=float,
        default=_LIMITS.calls_per_second,
        metavar="N",
        help="reducer calls per second per identity, on average (0: no limit)",
    )
    serve.add_argument(
        "--call-burst",
        type=int,
        default=_LIMITS.call_burst,
        metavar="N",
        help="calls one identity may make at once before the rate applies",
    )
    serve.add_argument(
        "--max-anonymous-calls-per-address",
        type=float,
        default=_LIMITS.anonymous_calls_per_address,
        metavar="N",
        help="reducer calls per second that all anonymous clients of one address (IPv6: /64) "
        "may make together (bursts of 2N; 0: no limit)",
    )
    serve.add_argument(
        "--max-anonymous-queries-per-address",
        type=float,
        default=_LIMITS.anonymous_queries_per_address,
        metavar="N",
        help="subscribes and one-off queries per second that all anonymous clients of one "
        "address (IPv6: /64) may send together (bursts of 2N; 0: no limit)",
    )
    serve.add_argument(
        "--max-queries-per-second",
        type=float,
        default=_LIMITS.queries_per_second,
        metavar="N",
        help="subscribes and one-off queries per second per identity (bursts of 2N; 0: none)",
    )
    serve.add_argument(
        "--reducer-budget-ms",
        type=_non_negative_int,
        default=_LIMITS.reducer_budget_ms,
        metavar="MS",
        help="longest a reducer may run before it is interrupted and rolled back, answered "
        "REDUCER_TIMEOUT (0: no limit)",
    )
    serve.add_argument(
        "--resume-window",
        type=int,
        default=_LIMITS.resume_window,
        metavar="TXS",
        help="recent transactions kept in memory for resume (older ones: the journal)",
    )
    cluster = serve.add_argument_group("replicas (several processes sharing one database)")
    cluster.add_argument(
        "--postgres",
        default=os.environ.get("SYNCD_POSTGRES_URL"),
        metavar="DSN",
        help="keep the journal in Postgres and elect a leader through it "
        "(env SYNCD_POSTGRES_URL); without it the embedded SQLite journal is used",
    )
    cluster.add_argument(
        "--redis",
        default=os.environ.get("SYNCD_REDIS_URL"),
        metavar="URL",
        help="fan committed transactions out through Redis (env SYNCD_REDIS_URL); "
        "without it replicas follow the journal by polling",
    )
    cluster.add_argument(
        "--advertise-url",
        default=os.environ.get("SYNCD_ADVERTISE_URL"),
        metavar="URL",
        help="http://host:port where the other replicas reach this one "
        "(default: the address it listens on)",
    )
    cluster.add_argument(
        "--lease-poll",
        type=float,
        default=_CLUSTER.lease_poll_s,
        metavar="SECONDS",
        help="how often replicas try to take over a lapsed leadership",
    )
    cluster.add_argument(
        "--lease-timeout",
        type=float,
        default=_CLUSTER.lease_timeout_s,
        metavar="SECONDS",
        help="a leader silent this long towards Postgres (frozen, cut off) loses leadership",
    )
    cluster.add_argument(
        "--heartbeat-lapse",
        type=float,
        default=_CLUSTER.heartbeat_lapse_s,
        metavar="SECONDS",
        help="a replica silent this long is dead: its clients are disconnected",
    )
    serve.add_argument(
        "--replica-id",
        default=os.environ.get("SYNCD_REPLICA_ID", "embedded"),
        help="this process's name in logs, /readyz and the connection table",
    )
    serve.add_argument("--log-level", default=os.environ.get("SYNCD_LOG_LEVEL", "info"))
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser(
        "migrate",
        help="show (and unless --dry-run, apply) what starting MODULE over a data directory "
        "(or a Postgres journal) does",
        description="Compare MODULE with the data directory's stored schema and print the plan: "
        "each change, automatic or refused, and the rows of each table. --query SQL (repeatable) "
        "checks queries against the new schema, as are those the clients of the running "
        "server(s) hold (recorded in the journal every few seconds). With --dry-run it works on a "
        "copy (a running server's directory too) and writes nothing; without it the migration is "
        "recorded as `syncd serve` would at start (stop the server first). With --postgres DSN "
        "the journal is the one replicas share: a dry run only reads it; applied, it takes the "
        "lease and is refused while a replica leads. Exit 2: refused; 1: a named or held query "
        "stops compiling; 0: fine.",
    )
    migrate.add_argument("module", metavar="MODULE")
    where = migrate.add_mutually_exclusive_group()
    where.add_argument("--data", default=os.environ.get("SYNCD_DATA", "syncd-data"))
    where.add_argument(
        "--postgres",
        metavar="DSN",
        default=None,
        help="the Postgres journal of --postgres replicas instead of a data directory",
    )
    migrate.add_argument("--dry-run", action="store_true", help="plan on a copy; write nothing")
    migrate.add_argument(
        "--query", action="append", metavar="SQL", help="a query to check (repeatable)"
    )
    migrate.add_argument(
        "--adopt-schema",
        action="store_true",
        help="MODULE is exactly the module that wrote this directory (written without stored "
        "schemas by an earlier syncd): record it",
    )
    migrate.set_defaults(func=_migrate)

    backup = sub.add_parser(
        "backup",
        help="copy the embedded journal while the server runs",
        description="Write a consistent copy of a data directory's journal and API keys into "
        "a new directory (itself a valid data directory). With --postgres the journal is in "
        "Postgres: use pg_dump or base backups instead (docs/operations.md).",
    )
    backup.add_argument("--data", default=os.environ.get("SYNCD_DATA", "syncd-data"))
    backup.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory")
    backup.set_defaults(func=_backup)

    restore = sub.add_parser(
        "restore",
        help="make a backup a server's data directory, optionally at an earlier point",
        description="Copy a backup (or any data directory, even one a server is running on: "
        "it is read consistently through SQLite, WAL included) into a new data directory. "
        "With --at-offset or --at-time the state is rolled back to that transaction. A new "
        "log epoch starts at the restored offset (clients holding an older cursor get a fresh "
        "state). A point before a migration is restored under the schema of that point (the "
        "migration is undone; a later module migrates it again). Prints the epoch, offset, "
        "rows per table and schema version a server on the new directory will report.",
    )
    restore.add_argument("backup", metavar="BACKUP_DIR", help="a backup or a data directory")
    restore.add_argument("--data", required=True, metavar="DIR", help="the new data directory")
    restore.add_argument(
        "--adopt-schema",
        action="store_true",
        help="MODULE is exactly the module that wrote the backup, which an earlier "
        "syncd wrote without storing schemas: record it (refused without this flag, since rows "
        "are positional and a swapped column would be misread)",
    )
    restore.add_argument(
        "--module", required=True, help="the module the data belongs to (to rebuild state)"
    )
    point = restore.add_mutually_exclusive_group()
    point.add_argument("--at-offset", type=int, metavar="N", help="the state after offset N")
    point.add_argument(
        "--at-time", metavar="ISO", help="the state after the last transaction at or before"
    )
    restore.set_defaults(func=_restore)

    # Before or after the action (`keys --data D list`, `keys list --data D`): SUPPRESS keeps
    # a value given before from being reset by the action's parser.
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--data",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="the data directory of a server (must exist; env SYNCD_DATA, default ./syncd-data)",
    )
    store.add_argument(
        "--postgres",
        default=argparse.SUPPRESS,
        metavar="DSN",
        help="manage the keys of replicas sharing this Postgres database instead "
        "(env SYNCD_POSTGRES_URL, used when neither flag is given); not with --data",
    )
    keys = sub.add_parser(
        "keys",
        parents=[store],
        help="create, list and revoke API keys",
        description="Manage the API keys of a data directory (also while the server runs: "
        "revoking a key closes the connections that use it within a second).",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser(
        "create", parents=[store], help="create a key; prints its secret once"
    )
    create.add_argument("--name", required=True, help="unique among the live keys")
    create.add_argument("--role", required=True, help='e.g. "service" or "authenticated"')
    keys_sub.add_parser("list", parents=[store], help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", parents=[store], help="revoke a key by id or name")
    revoke.add_argument("key", metavar="KEY_ID_OR_NAME")
    keys.set_defaults(func=_keys)

    loadtest = sub.add_parser(
        "loadtest",
        help="load-test a running server (or replicas behind a balancer)",
        description="Open a scenario's connections to URL from several processes, subscribe "
        "them, call reducers at the scenario's rates (optionally reconnecting waves of "
        "clients), then print what was delivered and how fast: updates and frames per second, "
        "write-to-visible and call latency, errors by code, and the server's /metrics before "
        "and after. Traffic goes only to URL (and its /metrics). See docs/loadtest.md. Exit 2: "
        "a bad scenario or option, or the target cannot be reached.",
    )
    loadtest.add_argument("url", metavar="URL", help="ws://HOST:PORT[/v1/ws] or http://HOST:PORT")
    loadtest.add_argument(
        "--scenario",
        required=True,
        metavar="FILE_OR_NAME",
        help="a TOML scenario file, or a ready one: chat_fanout, kled_rooms, reconnect_storm",
    )
    loadtest.add_argument(
        "--duration", type=_positive_float, metavar="SECONDS", help="instead of the scenario's"
    )
    loadtest.add_argument(
        "--connections", type=_positive_int, metavar="N", help="instead of the scenario's"
    )
    loadtest.add_argument(
        "--processes",
        type=_positive_int,
        default=max(1, min(8, os.cpu_count() or 1)),
        metavar="N",
        help="generator processes the connections are spread over (default: the cores, up to 8)",
    )
    credentials = loadtest.add_mutually_exclusive_group()
    credentials.add_argument(
        "--api-key",
        default=os.environ.get("SYNCD_LOADTEST_API_KEY"),
        metavar="KEY",
        help="every connection signs in with this API key (env SYNCD_LOADTEST_API_KEY)",
    )
    credentials.add_argument(
        "--token-secret",
        default=os.environ.get("SYNCD_LOADTEST_TOKEN_SECRET"),
        metavar="SECRET",
        help="mint an HS256 token per connection with this secret (the server's --jwt-secret; "
        "env SYNCD_LOADTEST_TOKEN_SECRET), its sub from the scenario's identity; without a key "
        "or secret connections are anonymous",
    )
    loadtest.add_argument("--token-issuer", default="syncd-loadtest", metavar="ISS")
    loadtest.add_argument("--token-audience", default="authenticated", metavar="AUD")
    loadtest.add_argument(
        "--metrics-url", metavar="URL", help="where to scrape /metrics (default: URL's host)"
    )
    loadtest.add_argument(
        "--json-out", metavar="FILE", help="write JSON lines (intervals, summary)"
    )
    loadtest.add_argument(
        "--report-dir",
        metavar="DIR",
        help="write report.json, intervals.jsonl and PNG plots (needs matplotlib: "
        "pip install 'syncd[loadtest]')",
    )
    loadtest.set_defaults(func=_loadtest)

    from syncd.codegen.cli import add_generate_parser

    add_generate_parser(sub)

    try:
        client_cli = importlib.import_module("syncd.client.cli")
    except ImportError:  # the client commands arrive with syncd.client
        pass
    else:
        client_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "info")).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except SyncdError as exc:
        # ConfigError (a mistake to fix), JournalError/BackendError (a database unreachable,
        # a directory in use): each says what is wrong and what to do.
        if args.debug:
            traceback.print_exc()
        print(f"syncd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A file or directory the command was given (permissions, a full disk, a missing one).
        if args.debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        print(
            f"syncd: {exc.strerror or exc}{where} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
