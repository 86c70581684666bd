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
"""
from __future__ import annotations

import signal
from types import FrameType

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; whatever could be saved was saved."""


class PreemptedAtStartUp(BaseException):
    """SIGTERM/SIGUSR1 before the first training step; nothing new to save. A BaseException, so
    that no `except Exception` on the way (an optional import probed, a cleanup) swallows it."""


class PreemptionWatch:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._immediate = False

    def install(self) -> None:
        """Idempotent; main thread only (where Python runs signal handlers)."""
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        if self._immediate:
            raise PreemptedAtStartUp(f"signal {signal.Signals(signum).name} during start-up")

    def start_up(self) -> None:
        """Enter the start-up phase; a signal recorded before (while importing) raises now."""
        self._immediate = True
        if self.signum is not None:
            raise PreemptedAtStartUp(f"signal {signal.Signals(self.signum).name} during start-up")

    def training(self) -> None:
        """Enter the training phase (or leave start-up after a preemption): signals are only
        recorded, for the loop to act on."""
        self._immediate = False

    @property
    def requested(self) -> bool:
        return self.signum is not None


PREEMPTION = PreemptionWatch()
