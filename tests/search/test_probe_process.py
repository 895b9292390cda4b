"""The search's probe in a child process (search.probe_process): the same answers as a Probe in-process, its errors
with their own type and message, and a child that never outlives the driver."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from optuna.trial import FixedTrial

from search.probe_process import ProbeProcess
from search.run import space_methods
from space.config import ModelSpec, SearchSpace, TaskSpec, sample_trial
from tests.conftest import REPO


def space() -> SearchSpace:
    return SearchSpace.model_validate({
        "model": {"checkpoint": "embedded-tiny"},
        "task": {"name": "digits", "shots_per_class": 2},
        "methods": {"lora_in_proj": {"enabled": "search", "rank": {"choices": [1, 8]}}, "a_log_delta": {}},
    })


DRAWS = [{"lora_in_proj.enabled": on, "lora_in_proj.rank": rank, "a_log_delta.enabled": not on}
         for on in (True, False) for rank in (1, 8)]


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_the_child_answers_as_a_probe_in_this_process_and_ends_when_closed():
    from trials.probe import Probe

    s = space()
    methods = space_methods(s)
    here = Probe(s.model, s.task, methods)
    cfgs = [sample_trial(s, FixedTrial(params)) for params in DRAWS]
    with ProbeProcess(s.model, s.task, methods) as probe:
        assert probe.info() == here.info()
        assert [probe.trainable(c) for c in cfgs] == [here.trainable(c) for c in cfgs]
        assert len({probe.trainable(c) for c in cfgs}) > 1  # the configurations differ, and so do their sizes
        child = probe._proc.pid
        assert psutil.Process(child).parent().pid == os.getpid()
    assert wait_gone(child, timeout=5)


def test_an_error_opening_the_model_or_task_keeps_its_type_and_message(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with ProbeProcess(ModelSpec(checkpoint=str(missing)), TaskSpec(name="digits"), {}) as probe:
        with pytest.raises(Exception) as child_error:
            probe.info()
    from trials.probe import Probe

    with pytest.raises(Exception) as own_error:
        Probe(ModelSpec(checkpoint=str(missing)), TaskSpec(name="digits"), {})
    assert type(child_error.value) is type(own_error.value)
    assert str(child_error.value) == str(own_error.value) and str(missing) in str(child_error.value)


def test_a_refused_method_is_the_probes_own_value_error():
    s = SearchSpace.model_validate({"model": {"checkpoint": "embedded-tiny"}, "task": {"name": "digits"},
                                    "methods": {"lora_x_proj_dt": {"rank": {"choices": [8]}}}})
    with ProbeProcess(s.model, s.task, space_methods(s)) as probe:
        with pytest.raises(ValueError, match=r"methods\.lora_x_proj_dt: .*rank 8 exceeds"):
            probe.info()


def test_a_pickled_copy_says_it_is_connected_to_nothing_and_the_original_still_answers():
    s = space()
    with ProbeProcess(s.model, s.task, {}) as probe:
        copy = pickle.loads(pickle.dumps(probe))  # what Ray Tune does with its searcher's state
        with pytest.raises(RuntimeError, match=r"unpickled copy of the search's probe process \(pid \d+\)"):
            copy.trainable(sample_trial(s, FixedTrial(DRAWS[0])))
        assert probe.info()["base_params"] > 0
        copy.close()  # nothing to end


def test_the_child_ignores_ctrl_c_and_ends_when_its_driver_is_killed(tmp_path):
    # A driver script without a __main__ guard (multiprocessing's spawn would run it again in the child), which
    # prints its probe's pid, then waits to be killed.
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from search.probe_process import ProbeProcess
        from space.config import ModelSpec, TaskSpec
        probe = ProbeProcess(ModelSpec(checkpoint="embedded-tiny"), TaskSpec(name="digits", shots_per_class=2), {})
        print(probe._proc.pid, probe.info()["base_params"], flush=True)
        time.sleep(600)
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env,
                              cwd=tmp_path)
    try:
        line = driver.stdout.readline()
        child, base = (int(v) for v in line.split())
        assert base > 0 and psutil.Process(child).is_running()
        os.kill(child, signal.SIGINT)
        time.sleep(0.5)
        assert psutil.Process(child).status() != psutil.STATUS_ZOMBIE  # Ctrl-C is the driver's to handle
        driver.kill()  # kill -9: no clean-up runs in the driver
        driver.wait(10)
        assert wait_gone(child), f"the probe process {child} outlived its killed driver"
    finally:
        driver.kill()


def test_a_child_that_dies_is_started_again_and_answers_the_same_until_its_restarts_run_out(tmp_path):
    s = space()
    cfg = sample_trial(s, FixedTrial(DRAWS[0]))
    log = tmp_path / "ray" / "probe.log"
    with ProbeProcess(s.model, s.task, space_methods(s), log=log, restarts=1) as probe:
        size = probe.trainable(cfg)
        first = probe._proc.pid
        os.kill(first, signal.SIGKILL)  # out of memory, say
        assert probe.trainable(cfg) == size and probe._proc.pid != first  # a new child, the same answer
        assert wait_gone(first, timeout=5)
        os.kill(probe._proc.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"the probe process ended \(exit code -9\) while the search asked it "
                                               r"for trainable, and it was restarted as often as allowed; its output "
                                               r"is in .*probe\.log"):
            probe.trainable(cfg)
    assert log.exists()  # the child's own output goes there, not to the terminal


def test_a_request_interrupted_before_its_answer_is_never_answered_by_the_next_ones_reply(monkeypatch):
    s = space()
    with ProbeProcess(s.model, s.task, space_methods(s), restarts=1) as probe:
        info = probe.info()
        conn = probe._conn
        real_recv = conn.recv

        def interrupted() -> object:
            raise KeyboardInterrupt  # Ctrl-C between the request and its answer

        monkeypatch.setattr(conn, "recv", interrupted)
        with pytest.raises(KeyboardInterrupt):
            probe.trainable(sample_trial(s, FixedTrial(DRAWS[0])))
        monkeypatch.setattr(conn, "recv", real_recv)
        assert probe.info() == info  # a fresh child and connection, not the stale reply of the interrupted request
