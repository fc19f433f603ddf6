"""Exactly-once runs across processes and machines that share ``output_dir``.

Before a (method entry, seed) run starts, its process claims it: it creates ``seed<N>.claim``
beside the run's JSON with ``O_CREAT | O_EXCL``, which one creator alone wins, on a local disk
and on NFS v3 or later. The file names the holder (host, pid, a random token, the start time),
and a daemon thread touches it every ``heartbeat_s`` seconds while the run lives. It is removed
when the run ends, however it ends (finished, failed, diverged, interrupted, pre-empted).

A second process that finds the claim skips the run (``running_elsewhere``) unless the holder is
gone:
- same host: the holder's pid no longer exists (or belongs to no process of ours);
- other host: the file was not touched for ``stale_after_s`` seconds (``loggers.claim_stale_s``,
  600 by default). Clocks of the machines are compared through file times, so keep them within
  a minute of each other (NTP).
A stale claim is taken over by renaming it aside (``.claim.stale-<token>``, kept for the
record) and checking that the renamed file is the one judged stale; if a fresh claim was moved
by mistake (another process took over between the two steps) it is linked back. The run then
resumes from the run's checkpoint, as any rerun does.

This is what makes a wandb sweep on many machines run each (method, seed) once:
``WANDB_SWEEP_ID`` turns on ``--skip-finished``, a duplicate point skips, and a pre-empted run
(SIGTERM, see ``cli``) is marked ``preempting`` so the controller hands it to the next agent,
which resumes it from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional


def claim_path(json_path: Path) -> Path:
    return Path(json_path).with_suffix(".claim")


def _read(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gone, or being written: the caller looks again


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunClaim:
    """The claim of one run; ``acquire()`` returns None when won, else a line naming the holder.

    Use as ``holder = claim.acquire(); ...; claim.release()``. ``release`` is idempotent and
    removes the file only while it is still this claim's own."""

    def __init__(self, json_path: Path, stale_after_s: float = 600.0,
                 heartbeat_s: float = 30.0):
        if not stale_after_s > 2 * heartbeat_s:
            raise ValueError(f"loggers.claim_stale_s must exceed twice the heartbeat "
                             f"({2 * heartbeat_s} s); got {stale_after_s!r}")
        self.path = claim_path(json_path)
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s)
        self.token = secrets.token_hex(8)
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, fh)
        return True

    def _stale(self, holder: Dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after_s

    def _take_over(self, holder: Dict[str, Any]) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{holder.get('token', 'unknown')}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else moved it first: the next _create decides
        moved = _read(aside)
        if moved is not None and moved.get("token") != holder.get("token"):
            try:  # a fresh claim was moved between our read and our rename: put it back
                os.link(aside, self.path)
                os.unlink(aside)
            except FileExistsError:
                pass

    def acquire(self) -> Optional[str]:
        for _ in range(5):
            if self._create():
                self.held = True
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return None
            holder = _read(self.path)
            if holder is None:
                time.sleep(0.05)  # being written or just removed
                continue
            if not self._stale(holder):
                return (f"claimed by {holder.get('host')} pid {holder.get('pid')} since "
                        f"{holder.get('started')} ({self.path})")
            self._take_over(holder)
        holder = _read(self.path) or {}
        return f"claimed by {holder.get('host')} pid {holder.get('pid')} ({self.path})"

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a lost claim file is noticed at release

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Preempted(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGUSR1 (what SLURM, Kubernetes and spot
    instances send before they stop a job): the run records ``preempted``, keeps its checkpoint,
    marks its wandb run ``preempting`` and ``cl-run`` exits 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def preemption_signals():
    """While inside: SIGTERM and SIGUSR1 raise ``Preempted`` in the main thread; the previous
    handlers come back on exit (in another thread this does nothing)."""
    import signal

    def handler(signum, frame):
        raise Preempted(signum)

    names = [n for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {n: signal.signal(getattr(signal, n), handler) for n in names}
    try:
        yield
    finally:
        for n, h in previous.items():
            signal.signal(getattr(signal, n), h)
