"""The README's Python API example runs as written, and its method x architecture table says what the code does."""

from __future__ import annotations

import os
import re

from tests.conftest import REPO


def test_readme_api_example_runs(tmp_path, capsys):
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    code = block.group(1).replace('"trials/assets/tiny-mamba"', repr(str(REPO / "trials/assets/tiny-mamba")))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    counts = re.search(r"# (\{.*\})", code)
    assert counts is not None and printed.strip() == counts.group(1)
    assert (tmp_path / "adapter" / "adapter.safetensors").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_the_readme_table_of_methods_by_architecture_says_what_supported_says():
    from trials.methods.registry import REGISTRY, supported

    text = (REPO / "README.md").read_text()
    table = text[text.index("| method | mamba | mamba2 |"):].split("\n\n")[0].splitlines()
    archs = [a.strip() for a in table[0].strip("|").split("|")[1:]]
    seen: set[str] = set()
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`([a-z0-9_]+)`", cells[0])
        seen.update(names)
        for arch, cell in zip(archs, cells[1:], strict=True):
            for name in names:
                assert (supported(name, arch) is None) == cell.startswith("yes"), (name, arch, cell)
    assert seen == set(REGISTRY)
