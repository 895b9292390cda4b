"""The dashboard in a real browser: a small real search, ``streamlit run`` on its store, and headless Chromium
driven over the DevTools protocol (environment.md: wait for ``.js-plotly-plot`` before the screenshot; a plain
``--screenshot`` is blank about one time in three).

In CI (CI=true) Chromium must be there (``make test``'s setup installs Debian's ``chromium``); elsewhere the test
skips, naming why. The screenshots are kept under the test's tmp dir and copied to ``outputs/test-artifacts/``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from search import results
from tests.conftest import IN_CI, REPO
from tests.dashboard.conftest import free_port

ARTIFACTS = REPO / "outputs" / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1800"]
SPACE = """
name: browser
model: {checkpoint: embedded}
task: {name: digits, shots_per_class: 2}
methods:
  lora_in_proj: {enabled: search, rank: {choices: [1, 2]}}
  a_log_delta: {enabled: search}
training: {budget: {min_steps: 2, max_steps: 4, reduction_factor: 2}, batch_size: 8}
search:
  num_trials: 4
  concurrency: 2
  pruner: {name: none}
  reevaluate: {top: 1, seeds: 1}
  results_dir: RESULTS
"""

# The front chart's points per trial state, read from plotly's own figure in the page.
COUNT_POINTS = """
(() => {
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  const front = plots.find(p => (p.data || []).some(t => t.meta === 'trials'));
  if (!front) return null;
  const counts = {};
  for (const t of front.data.filter(t => t.meta === 'trials'))
    for (const c of t.customdata) counts[c[0]] = (counts[c[0]] || 0) + 1;
  return JSON.stringify(counts);
})()
"""


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _wait_http(url: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@contextlib.contextmanager
def _process(args: list[str], **kwargs: Any) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


class DevTools:
    """One page of a Chromium over the DevTools protocol (JSON messages on a websocket)."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=20)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 3000) : ''")
        raise AssertionError(f"{what} did not appear within {timeout} s; the page says:\n{text}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, ARTIFACTS / path.name)
        return path


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small real search (Ray, Optuna, MLflow) run to the end; its tracking URI."""
    tmp = tmp_path_factory.mktemp("browser-search")
    space = tmp / "space.yaml"
    space.write_text(SPACE.replace("RESULTS", str(tmp / "runs")))
    done = subprocess.run([sys.executable, "-m", "search.run", str(space), "--quiet"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return f"sqlite:///{tmp / 'runs' / 'mlflow.db'}"


def _not_blank(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        low, high = image.convert("L").getextrema()
    return high - low > 50


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dashboard_in_chromium_draws_one_point_per_finished_trial_and_the_methods_view(
        finished_search: str, tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:
        if IN_CI:
            pytest.fail("chromium is missing in CI: `make test`'s setup installs Debian's chromium with apt")
        pytest.skip("no chromium on this machine (apt-get install chromium); CI installs it in `make test`")
    c = results.client(finished_search)
    info = results.latest_search(c, results.DEFAULT_EXPERIMENT)
    df = results.trials(c, results.DEFAULT_EXPERIMENT, info["run_id"])
    finished = int(((df.status == results.STATUS_FINISHED) & (df.phase != results.BASELINE)).sum())
    assert finished >= 2

    app_port, debug_port = free_port(), free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": finished_search}
    streamlit = [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
                 "--server.address", "127.0.0.1", "--server.port", str(app_port),
                 "--browser.gatherUsageStats", "false"]
    with tempfile.TemporaryDirectory() as profile, \
            _process(streamlit, cwd=REPO, env=env), \
            _process([browser, *CHROMIUM_FLAGS, f"--remote-debugging-port={debug_port}",
                      f"--user-data-dir={profile}", "about:blank"]):
        _wait_http(f"http://127.0.0.1:{app_port}/_stcore/health", 60)
        _wait_http(f"http://127.0.0.1:{debug_port}/json/version", 60)
        pages = json.loads(_wait_http(f"http://127.0.0.1:{debug_port}/json/list", 10))
        page = DevTools(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Page.navigate", url=f"http://127.0.0.1:{app_port}/")
        page.wait_for("document.querySelectorAll('.js-plotly-plot').length > 0", 90, "a plotly chart")
        counts = json.loads(page.wait_for(COUNT_POINTS, 30, "the front chart's trial points"))
        time.sleep(1)  # let plotly finish drawing before the shot
        front = page.screenshot(tmp_path / "dashboard-front.png")

        assert counts.get(results.STATUS_FINISHED) == finished, counts
        assert _not_blank(front)

        page.evaluate("[...document.querySelectorAll('[role=tab]')].find(t => t.innerText.trim() === 'Methods')"
                      ".click()")
        page.wait_for("document.body.innerText.includes('Parameter importances')", 30, "the methods view")
        page.wait_for("document.body.innerText.includes('Per method')", 10, "the per-method table")
        time.sleep(1)
        methods = page.screenshot(tmp_path / "dashboard-methods.png")
        text = page.evaluate("document.body.innerText")
        assert "could not be drawn" not in text and "Traceback" not in text
        assert _not_blank(methods)


def test_make_test_installs_chromium_with_apt_in_ci_only_when_it_is_missing() -> None:
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "command -v chromium" in dry
    assert '[ "$CI" = "true" ]' in dry and "apt-get install -y -q chromium" in dry
