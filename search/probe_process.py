"""The search's ``trials.probe.Probe`` in a child process of the driver, opened at once.

The driver imports no torch, so what it must know of the model (its size, the closed-form trainable count of each
proposal, the refusals of methods it cannot take) comes from a ``Probe`` in another process. Opening one costs
seconds (importing torch and transformers, loading the checkpoint and the task); in this process it starts before
the driver imports Ray and runs beside ``ray.init``, rather than after it in a Ray actor, which took those seconds
off every search's start-up. It lives on the driver's machine as long as the driver, so a lost Ray node never takes
it along, and it ends with the driver, also when the driver is killed (its pipe closes: ``_serve`` returns).

Errors in the child keep their type and message: ``info()`` raises the one opening the model or the task raised.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from space.config import ModelSpec, TaskSpec, TrialConfig


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles (so the driver sees its own type and message), else a RuntimeError saying what it was."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any unpicklable error is reported by name and message
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(conn: Connection) -> None:
    """The child: receive what to open, open the probe, then answer ``(what, args)`` requests until the driver
    closes the connection."""
    # The child runs in its own session (ProbeProcess), away from the terminal's Ctrl-C; a SIGINT sent to it
    # directly is ignored too: it ends when the driver closes the connection, or dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model, task, methods = conn.recv()
    except (EOFError, OSError):  # the driver ended before it said what to open
        return
    error: BaseException | None = None
    try:
        from trials.probe import Probe

        probe = Probe(model, task, methods)
    except Exception as exc:  # noqa: BLE001 - handed to the driver by info(); OSError too (a missing file)
        error = _portable(exc)
    while True:
        try:
            what, args = conn.recv()
        except (EOFError, OSError):  # the driver closed the connection, or died
            return
        try:
            if error is not None:
                raise error
            value = probe.info() if what == "info" else probe.trainable(*args)
            conn.send((True, value))
        except Exception as exc:  # noqa: BLE001 - raised again in the driver
            conn.send((False, _portable(exc)))


class ProbeProcess:
    """``info()`` and ``trainable(cfg)`` of a ``Probe`` opened in a child process (see the module's doc).

    The child starts at construction; the first ``info()`` waits until it has opened the model. A child that dies
    (killed, out of memory) is started again, up to ``restarts`` times: the probe is deterministic, so the answers
    are the same. Thread-safe: one request at a time. A context manager: leaving it ends the child. ``log``: where
    the child's own output goes (warnings of the libraries it loads); by default the driver's stderr."""

    def __init__(self, model: ModelSpec, task: TaskSpec, methods: dict[str, Any], log: Path | None = None,
                 restarts: int = 2) -> None:
        self._spec = (model, task, methods)
        self._log = log
        self._restarts_left = restarts
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._start()

    def _start(self) -> None:
        # A fresh interpreter running this module, not multiprocessing's spawn: spawn runs the caller's main script
        # again in the child, which a script without a ``__main__`` guard cannot take.
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # where `search` and `trials` are, as in the driver
        # The child has the driver's sys.path but for its first entry (the driver's script or working directory):
        # add the package's root only if that is where the driver found it, and after the user's own entries.
        if root not in {str(Path(p).resolve()) for p in sys.path[1:] if p}:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), root) if p)
        out = None
        if self._log is not None:
            self._log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self._log, "ab")  # noqa: SIM115 - the child holds it; closed here once handed over
        try:
            # Its own session: a Ctrl-C or a SIGTERM to the terminal's process group is the driver's to handle (Ray
            # Tune stops the search, which may still ask sizes while it winds down); the child ends with the driver.
            self._proc = subprocess.Popen([sys.executable, "-m", "search.probe_process", str(theirs.fileno())],
                                          pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=out, start_new_session=True)
        finally:
            theirs.close()  # the child's end lives in the child alone: its death closes the connection for the driver
            if out is not None:
                out.close()
        self._conn = Connection(ours.detach())
        self._conn.send(self._spec)

    # Ray Tune pickles its searcher (and so this) into the experiment's state; a copy unpickled elsewhere is not
    # connected to the child and says so if asked (a search resumes from Optuna and MLflow, never from that state).
    def __getstate__(self) -> dict[str, Any]:
        return {"pid": self._proc.pid if self._proc is not None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._proc, self._conn, self._lock, self._copy_of = None, None, threading.Lock(), state.get("pid")

    def _ask(self, what: str, *args: Any) -> Any:
        if self._proc is None:
            raise RuntimeError(f"this is an unpickled copy of the search's probe process (pid {self._copy_of}): it "
                               "is connected to nothing, and only the driver that started the probe can ask it")
        with self._lock:
            while True:
                try:
                    if self._conn is None:
                        raise EOFError("the connection was closed")
                    self._conn.send((what, args))
                    ok, value = self._conn.recv()
                    break
                except (EOFError, OSError) as exc:
                    self._end_child()
                    if self._restarts_left <= 0:
                        where = f"; its output is in {self._log}" if self._log is not None else ""
                        raise RuntimeError(f"the probe process ended (exit code {self._proc.returncode}) while the "
                                           f"search asked it for {what}, and it was restarted as often as allowed"
                                           f"{where}") from exc
                    self._restarts_left -= 1
                    self._start()  # the same model and task: the same answers
                except BaseException:
                    # Interrupted between a request and its answer (Ctrl-C in a library caller): the next answer on
                    # this connection would be this one's, so it is not used again.
                    self._end_child()
                    self._conn = None
                    raise
        if not ok:
            raise value
        return value

    def info(self) -> dict[str, Any]:
        """The probe's ``info()``: sizes, classes, notes; raises what opening the model or the task raised."""
        return dict(self._ask("info"))

    def trainable(self, cfg: TrialConfig) -> int:
        """Closed-form trainable parameters of ``cfg`` (``Probe.trainable``)."""
        return int(self._ask("trainable", cfg))

    def _end_child(self) -> None:
        """Close the connection (an idle child returns at once), else terminate, then kill the child. Never raises."""
        if self._conn is not None:
            self._conn.close()
        if self._proc is None:
            return
        for stop in (None, self._proc.terminate, self._proc.kill):
            if stop is not None:
                stop()
            try:
                self._proc.wait(timeout=1 if stop is None else 5)
                return
            except subprocess.TimeoutExpired:  # still opening the model (the search stopped before it asked)
                continue

    def close(self) -> None:
        """End the child."""
        if self._proc is not None:
            self._end_child()
            self._conn = None

    def __enter__(self) -> ProbeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
