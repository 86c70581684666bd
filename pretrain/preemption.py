"""SIGTERM/SIGUSR1 handling from the first instant of a run (standard library only, so the entry
point can install it before the seconds of importing torch).

Schedulers preempt with SIGTERM (Kubernetes, Slurm's KillWait) or a configured SIGUSR1, then kill a
little later. A signal must never leave a run without `summary.json`, or the launch scripts cannot
tell a preemption (requeue) from a crash. Two phases:
- start-up (config, process groups, model build, resume): nothing new to save, and the process may
  sit in a rendezvous or a long build, so the handler raises `Preempted` at once;
- training: the handler only records the signal; the loop saves a checkpoint at the next step
  boundary on every rank together, then raises `Preempted`.
Either way the process exits 75 (EX_TEMPFAIL) with status "preempted" in summary.json.

Python runs signal handlers only between bytecodes of the main thread, and start-up can sit for
minutes inside one C++ call (a rendezvous waiting for the other nodes, a collective). So the
signal also wakes a watcher thread (`signal.set_wakeup_fd`): if the main thread has not acted on a
start-up signal within a grace period, the watcher writes the summary itself and exits 75.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

EXIT_PREEMPTED = 75

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; whatever could be saved was saved."""


class PreemptedAtStartUp(BaseException):
    """SIGTERM/SIGUSR1 before the first training step; nothing new to save. A BaseException, so
    that no `except Exception` on the way (an optional import probed, a cleanup) swallows it."""


class PreemptionWatch:
    def __init__(self, grace_s: float = 3.0) -> None:
        self.signum: int | None = None
        self._immediate = False
        self._grace_s = grace_s
        self._wakeup = -1  # read end of the pipe Python's C-level signal handler writes to
        self._watcher: threading.Thread | None = None

    def install(self) -> None:
        """Idempotent; main thread only (where Python runs signal handlers)."""
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        if self._immediate:
            raise PreemptedAtStartUp(f"signal {signal.Signals(signum).name} during start-up")

    def start_up(self, on_stuck: Callable[[str], None] | None = None) -> None:
        """Enter the start-up phase; a signal recorded before (while importing) raises now.
        `on_stuck(reason)` (once per process) is what the watcher does before exiting 75 when the
        main thread cannot act on a start-up signal: write summary.json."""
        self._immediate = True
        if on_stuck is not None and self._watcher is None:
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            self._wakeup = read_end
            self._watcher = threading.Thread(target=self._watch, args=(on_stuck,), daemon=True,
                                             name="preemption-watcher")
            self._watcher.start()
        if self.signum is not None:
            raise PreemptedAtStartUp(f"signal {signal.Signals(self.signum).name} during start-up")

    def _watch(self, on_stuck: Callable[[str], None]) -> None:
        while True:
            woken = os.read(self._wakeup, 64)
            signums = [s for s in woken if s in PREEMPTION_SIGNALS]
            if not signums or not self._immediate:
                continue
            time.sleep(self._grace_s)  # the main thread raises PreemptedAtStartUp if it runs Python
            if self._immediate:  # still in start-up: blocked in C code
                on_stuck(f"signal {signal.Signals(signums[0]).name} during start-up (in a blocking call)")
                os._exit(EXIT_PREEMPTED)

    def training(self) -> None:
        """Enter the training phase (or leave start-up after a preemption): signals are only
        recorded, for the loop to act on."""
        self._immediate = False

    @property
    def requested(self) -> bool:
        return self.signum is not None


PREEMPTION = PreemptionWatch()
