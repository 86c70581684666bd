"""A launch independent of its scheduler: which trainers to start, where they write, and the
environment the node scripts (launch/scripts/) read."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launch.validate import NO_CONTROL, LaunchError

REQUEUE_EXIT_CODE = 75  # pretrain.trainer.EXIT_PREEMPTED; launch/ does not import pretrain/
DEFAULT_GRACE_S = 300  # --grace-s: seconds the trainers get to checkpoint after a preemption signal
SCRIPTS = Path(__file__).parent / "scripts"
# torchrun passes these on to the trainers (Slurm's USR1 before the time limit included) and then
# waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for them to save before it kills them (torchrun reads
# PET_<OPTION> for --<option>; torch < 2.12 ignores the timeout and waits 30 s).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclass(frozen=True)
class LaunchSpec:
    """What every scheduler starts: per node, one torchrun with `nproc_per_node` trainers."""

    job_name: str
    nodes: int
    gpus_per_node: int
    nproc_per_node: int
    cpus_per_rank: int
    run_dir: str
    python: str
    master_port: int
    omp_threads: int
    grace_s: int
    train_args: tuple[str, ...]
    workdir: str | None = None

    def __post_init__(self) -> None:
        if any(a == "--run-dir" or a.startswith("--run-dir=") for a in self.train_args):
            raise LaunchError("--run-dir: give it to the renderer, not after --; the launchers and the trainers "
                              "share it")
        if self.gpus_per_node and self.nproc_per_node != self.gpus_per_node:
            raise LaunchError(f"--procs-per-node {self.nproc_per_node}: one trainer per GPU, so it must equal "
                              f"--gpus-per-node {self.gpus_per_node}; leave it out")
        NO_CONTROL.check("--python", self.python)
        for option, value in (("--python", self.python), ("--workdir", self.workdir or "")):
            if value.startswith("~"):  # written quoted, so no shell on the nodes would expand it
                raise LaunchError(f"{option} {value!r}: '~' is not expanded in the rendered job; give the absolute "
                                  "path")
        for value in (self.run_dir, self.python, self.workdir or "", *self.train_args):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # bytes the terminal could not decode (Python keeps them as surrogates)
                raise LaunchError(f"{value!r}: not valid UTF-8 text; retype it") from None

    def environment(self) -> dict[str, str]:
        """The variables launch/scripts/ read, besides the scheduler's own."""
        return {"RUN_DIR": self.run_dir, "PYTHON": self.python, "NPROC_PER_NODE": str(self.nproc_per_node),
                "MASTER_PORT": str(self.master_port), "OMP_NUM_THREADS": str(self.omp_threads),
                "REQUEUE_EXIT_CODE": str(REQUEUE_EXIT_CODE), "PET_SIGNALS_TO_HANDLE": FORWARDED_SIGNALS,
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(self.grace_s),
                # the trainers record a bad configuration in summary.json, where run_exit_code reads it
                "LAUNCH_READS_SUMMARY": "1"}


def node_script(*names: str) -> str:
    """The static shell text of launch/scripts/NAME..., joined; no value is ever pasted into it."""
    return "\n".join((SCRIPTS / name).read_text() for name in names)
