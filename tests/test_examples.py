"""Every space and trial config the repository ships (examples, docs, docker, the default space.yaml) is valid: a
user copies them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from space.config import SearchSpace, TrialConfig, load_space

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted({REPO / "space.yaml", *REPO.glob("examples/*.yaml"), *REPO.glob("docs/**/*.yaml"),
                  *REPO.glob("docker/*.yaml")})


def test_the_shipped_configs_are_found():
    names = {p.relative_to(REPO).as_posix() for p in SHIPPED}
    assert {"space.yaml", "docs/compare-digits.yaml", "docs/embedded/stdlib_modules.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_each_shipped_config_is_valid(path, monkeypatch):
    text = path.read_text()
    for name in re.findall(r"\$\{(\w+)\}", text):  # credentials come from the environment (docker-compose.yml)
        monkeypatch.setenv(name, "x")
    raw = yaml.safe_load(text)
    if "search" in raw or "objectives" in raw:
        assert isinstance(load_space(path), SearchSpace)
    else:
        TrialConfig.model_validate(raw)
