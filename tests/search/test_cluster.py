"""A search on a real two-node Ray cluster (both nodes on this machine), with Optuna and MLflow on PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest

from search import results
from search.resume import terminate
from tests.search.test_end_to_end import SPACE

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_processes(gcs_port: int) -> list[psutil.Process]:
    """The processes of the cluster whose GCS listens on ``gcs_port``: those naming that port on their command line
    (GCS, raylets, dashboard, monitors) and all their descendants (workers and agents), never another cluster's."""
    names_port = re.compile(rf"(gcs_server_port=|:){gcs_port}\b")
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if "ray" in cmdline and names_port.search(cmdline):
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def end_cluster(gcs_port: int, grace: float = 5.0) -> None:
    """This cluster's processes only (`ray stop` would end every cluster on the machine)."""
    terminate(cluster_processes(gcs_port), grace)


@pytest.fixture
def two_nodes():
    """A head and a second node, one CPU each, so two concurrent one-CPU trials must use both."""
    # Ray's socket paths must stay under the Unix limit (107 bytes): a short temporary directory, not tmp_path.
    temp = tempfile.mkdtemp(prefix="mps-ray-", dir="/tmp")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                        *common], check=True, env=env, capture_output=True, timeout=120)
        # Its own address, so that each trial's node shows in Ray Tune's record of it (node_ip).
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.2", *common],
                       check=True, env=env, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        end_cluster(port)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_a_search_joins_a_two_node_cluster_and_its_trials_run_on_both_nodes(two_nodes, tmp_path, postgres_stores):
    import ray
    from ray.tune import ExperimentAnalysis

    optuna_url, mlflow_url = postgres_stores
    trials = 4
    space = tmp_path / "space.yaml"
    extra = (f"  optuna_storage: {optuna_url}\n  study_name: cluster\n  cpus_per_trial: 1\n"
             f"tracking: {{uri: '{mlflow_url}'}}\n")
    space.write_text(SPACE.format(trials=trials, results=tmp_path / "runs", extra=extra, concurrency=2))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # The driver is a separate process, as a user's would be; it joins the cluster with --address.
    run = subprocess.run([sys.executable, "-m", "search.run", str(space), "--address", two_nodes],
                         env=env, capture_output=True, text=True, timeout=800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # Ray's own records: the cluster's two nodes, and Ray Tune's record of the node each trial ran on.
    ray.init(address=two_nodes, log_to_driver=False)
    try:
        nodes = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert len(nodes) == 2 and "127.0.0.2" in nodes
    (experiment,) = [d for d in (tmp_path / "runs" / "ray").iterdir() if list(d.glob("experiment_state-*.json"))]
    ran_on = [t.last_result.get("node_ip") for t in ExperimentAnalysis(str(experiment)).trials]
    assert len(ran_on) >= trials and set(ran_on) == nodes, ran_on

    c = results.client(mlflow_url)
    info = results.latest_search(c, "mamba-peft-search")
    assert info["status"] == results.STATUS_FINISHED
    df = results.trials(c, "mamba-peft-search", info["run_id"])
    assert len(df[df.phase != results.REEVALUATE]) == trials
    assert len(optuna.load_study(study_name="cluster", storage=optuna_url).trials) == trials


LONG_TRIALS = """
name: lost-node
model: {{checkpoint: embedded}}
task: {{name: digits, shots_per_class: 4}}
methods: {{lora_in_proj: {{enabled: true, rank: {{choices: [1, 2, 4]}}}}}}
training: {{budget: {{rungs: [400], max_steps: 400}}, batch_size: 8,
           learning_rate: {{low: 0.001, high: 0.01, log: true}}}}
search: {{num_trials: 3, concurrency: 2, cpus_per_trial: 1, pruner: none, reevaluate: {{top: 0}},
          results_dir: {results}, optuna_storage: {optuna}, study_name: lost-node}}
tracking: {{uri: '{mlflow}'}}
"""


def raylet_of(gcs_port: int, node_ip: str) -> psutil.Process:
    (raylet,) = [p for p in cluster_processes(gcs_port) if "raylet" in p.name()
                 and f"--node_ip_address={node_ip}" in " ".join(p.cmdline())]
    return raylet


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_a_trial_whose_node_is_lost_runs_again_on_a_live_node_and_the_search_finishes(two_nodes, tmp_path,
                                                                                       postgres_stores):
    optuna_url, mlflow_url = postgres_stores
    space = tmp_path / "space.yaml"
    space.write_text(LONG_TRIALS.format(results=tmp_path / "runs", optuna=optuna_url, mlflow=mlflow_url))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "search.run", str(space), "--address", two_nodes], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(driver.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while sum(" start " in line for line in lines) < 2:  # one trial on each node (one CPU each)
            assert driver.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        time.sleep(3)
        raylet_of(int(two_nodes.rsplit(":", 1)[1]), "127.0.0.2").kill()  # the second node is lost mid-trial
        assert driver.wait(timeout=600) == 0, "".join(lines)
    finally:
        driver.kill()
        reader.join(timeout=10)
    out = "".join(lines)
    restarted = [line for line in out.splitlines() if " restarted " in line]
    assert len(restarted) == 1 and "its worker was lost" in restarted[0], out
    assert "] failed " not in out and " failed:" not in out, out  # nor the probe actor it also lost
    assert "Traceback" not in out, out  # Ray Tune's own goes to its log file

    c = results.client(mlflow_url)
    info = results.latest_search(c, "mamba-peft-search")
    assert info["status"] == results.STATUS_FINISHED
    df = results.trials(c, "mamba-peft-search", info["run_id"])
    assert sorted(df.status) == ["finished"] * 3, df
    assert sorted(c.get_run(r).data.tags.get("mps.restarts", "0") for r in df.run_id) == ["0", "0", "1"]
    states = [t.state.name for t in optuna.load_study(study_name="lost-node", storage=optuna_url).trials]
    assert states == ["COMPLETE"] * 3


def test_ending_a_cluster_ends_its_processes_and_leaves_other_clusters_alone():
    port = free_port()

    def look_alike(gcs: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "ray",
                                 f"--gcs-address=127.0.0.1:{gcs}"])

    ours, other, prefix = look_alike(port), look_alike(port + 1), look_alike(int(f"{port}0"))
    try:
        time.sleep(0.3)
        found = {p.pid for p in cluster_processes(port)}
        assert ours.pid in found and other.pid not in found and prefix.pid not in found
        end_cluster(port, grace=0.5)
        assert ours.wait(timeout=5) is not None
        assert other.poll() is None and prefix.poll() is None
    finally:
        for proc in (ours, other, prefix):
            proc.kill()
