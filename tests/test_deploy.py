"""deploy/: every file parses, and every `syncd` flag, SYNCD_* variable and HTTP path it uses
exists in the CLI and the server (the image is not built here: no Docker in CI)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncd.cli import build_parser
from tests.utils import ROOT

DEPLOY = ROOT / "deploy"
CLI = (ROOT / "syncd" / "cli.py").read_text()
APP = (ROOT / "syncd" / "server" / "app.py").read_text()


def routes() -> set[str]:
    return set(re.findall(r'Route\("(/[^"]*)"', APP))


def env_names() -> set[str]:
    """The SYNCD_* variables the CLI reads."""
    return set(re.findall(r'environ\.get\(\s*"(SYNCD_[A-Z_]+)"', CLI))


def check_serve(args: list[str]) -> None:
    """`syncd serve ARGS` parses: every flag exists and every value has the right type."""
    try:
        parsed = build_parser().parse_args(["serve", *args])
    except SystemExit as exc:  # argparse printed why
        raise AssertionError(f"syncd serve {shlex.join(args)}: not accepted ({exc})") from None
    assert Path(parsed.module).is_absolute(), parsed.module
    # The module the image serves is one the image copies (schema/ -> /app/schema/).
    assert (ROOT / parsed.module.removeprefix("/app/")).is_file(), parsed.module


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its argument (JSON form parsed), continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, rest = line.strip().partition(" ")
        found.setdefault(instruction.upper(), []).append(rest.strip())
    return found


def test_dockerfile() -> None:
    found = dockerfile()
    assert found["FROM"] == ["python:3.11-slim"]
    user = found["USER"][-1]
    assert user not in ("root", "0")
    entrypoint = json.loads(found["ENTRYPOINT"][-1])
    assert entrypoint == ["syncd", "serve"]
    check_serve(json.loads(found["CMD"][-1]))
    # The package is installed, and `syncd` is its console script.
    assert any(r.startswith("pip install .") for r in found["RUN"])
    assert 'syncd = "syncd.cli:main"' in (ROOT / "pyproject.toml").read_text()
    # Every file COPY names exists.
    for copy in found["COPY"]:
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    (healthcheck,) = found["HEALTHCHECK"]
    _, _, command = healthcheck.partition("CMD ")
    probe = " ".join(json.loads(command))
    assert "/healthz" in probe and "/healthz" in routes()
    for name in re.findall(r"SYNCD_[A-Z_]+", " ".join(found["ENV"] + [probe])):
        assert name in env_names(), name


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_compose() -> None:
    (compose,) = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    replicas = {k: v for k, v in services.items() if k.startswith("syncd")}
    assert len(replicas) == 3
    assert "postgres" in services and "redis" in services
    advertised = set()
    for name, service in replicas.items():
        check_serve(service["command"])
        env = service["environment"]
        assert set(env) <= env_names(), set(env) - env_names()
        assert env["SYNCD_POSTGRES_URL"].startswith("postgresql://")
        assert env["SYNCD_REDIS_URL"].startswith("redis://")
        # One JWT secret, from the environment, the same for every replica.
        assert env["SYNCD_JWT_SECRET"].startswith("${SYNCD_JWT_SECRET")
        args = service["command"]
        advertised.add(args[args.index("--advertise-url") + 1])
        assert args[args.index("--advertise-url") + 1] == f"http://{name}:3000"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert len(advertised) == 3


def k8s() -> dict[str, list[Any]]:
    by_kind: dict[str, list[Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_yaml(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def test_kubernetes() -> None:
    by_kind = k8s()
    (workload,) = by_kind["StatefulSet"]
    spec = workload["spec"]
    assert spec["replicas"] >= 3
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    check_serve(container["args"])
    paths = routes()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["path"] in paths
    ports = {p["name"] for p in container["ports"]}
    # The URLs and the JWT secret come from a Secret that declares them.
    secrets = {s["metadata"]["name"]: s for s in by_kind["Secret"]}
    declared = {e["name"] for e in container["env"]}
    for env in container["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if env["name"].startswith("SYNCD_"):
            assert env["name"] in env_names(), env["name"]
        if ref is not None:
            assert ref["key"] in secrets[ref["name"]]["stringData"]
    for needed in ("SYNCD_POSTGRES_URL", "SYNCD_REDIS_URL"):
        (env,) = [e for e in container["env"] if e["name"] == needed]
        assert "secretKeyRef" in env["valueFrom"], needed
    # $(VAR) in args refers to a variable the container declares.
    for arg in container["args"]:
        for name in re.findall(r"\$\((\w+)\)", arg):
            assert name in declared, name
    # A budget and Services that select the workload's pods.
    (pdb,) = by_kind["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    assert spec["serviceName"] in services
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports


@pytest.mark.parametrize("bad", [["--no-such-flag"], ["--port", "x"]])
def test_the_check_catches_a_bad_flag(bad: list[str]) -> None:
    with pytest.raises(AssertionError):
        check_serve(["/app/schema/chat.py", *bad])
