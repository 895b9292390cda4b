"""The lock (requirements.lock) is the whole dependency set, and it agrees with pyproject.toml and constraints.txt.

`make run`, `make test` and the Dockerfile install exactly the lock, so a lock that misses a dependency, or
pins a version outside pyproject.toml's range, or a torch other than this machine kind's, would make a fresh
clone install something CI never tested.
"""

from __future__ import annotations

import os

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO


def locked() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_dependency_is_locked_within_its_range():
    pins = locked()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but not in requirements.lock (run make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}")


def test_the_locked_torch_is_the_cpu_wheel_constraints_txt_pins():
    pinned = [line for line in (REPO / "constraints.txt").read_text().split() if line.startswith("torch==")]
    assert pinned == ["torch==2.13.0"]
    torch = locked()["torch"]
    assert torch.public == "2.13.0" and torch.local == "cpu"


def test_the_installed_environment_is_the_lock():
    """What this suite runs on is what the lock says (make test installs it); a drift shows here first."""
    from importlib.metadata import distributions

    if os.environ.get("MAMBA_PEFT_TEST_LATEST"):
        pytest.skip("make test-latest runs on the newest allowed versions, not the lock, on purpose")
    pins = locked()
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in distributions()}
    for name in ("torch", "transformers", "optuna", "ray", "mlflow", "streamlit", "sqlalchemy", "pydantic"):
        assert installed[name] == pins[name], f"{name} {installed[name]} is installed, the lock says {pins[name]}"
