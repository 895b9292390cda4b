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


def _model_type(path: Path) -> str | None:
    """The architecture an example's checkpoint is: the embedded ones by name, a fixture by the command that writes
    it (``--write-fixture TYPE DIR`` in the example's comment)."""
    checkpoint = str(load_space(path).model.checkpoint)
    if checkpoint.startswith("embedded"):
        return "mamba2" if checkpoint == "embedded-mamba2" else "mamba"
    written = re.search(rf"--write-fixture (\w+) {re.escape(checkpoint)}\b", path.read_text())
    return written.group(1) if written else None


@pytest.mark.parametrize("path", sorted(REPO.glob("examples/*.yaml")), ids=lambda p: p.name)
def test_each_example_uses_only_methods_its_architecture_supports(path):
    from trials.methods.registry import supported

    model_type = _model_type(path)
    assert model_type is not None, f"{path.name}: say which architecture its checkpoint is (--write-fixture)"
    space = load_space(path)
    refused = {m: r for m in space.methods if (r := supported(m, model_type)) is not None}
    assert not refused, refused


def test_there_is_an_example_for_each_supported_architecture():
    from trials.models.interface import architectures

    assert {_model_type(p) for p in REPO.glob("examples/*.yaml")} == set(architectures())
