"""The README's Python API example runs as written."""

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
