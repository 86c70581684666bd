"""A real one-node Slurm cluster on localhost for the launcher tests (Debian's slurm-wlm + munge).

Everything lives in one temporary directory (configuration, munge key and socket, state, logs)
and runs on free ports, so it touches no system-wide Slurm or munge set-up; the daemons run in
the foreground as children of the test and are stopped, jobs first, when it ends, also when it
fails. Should the test process itself be killed, the daemons get SIGTERM with it, but a job
running at that moment keeps its slurmstepd/srun processes, which then need killing by hand.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from free_port import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}
INSTALL_HINT = "apt-get install slurm-wlm munge (.ci/run does it)"


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why a local cluster cannot run here, or None when it can."""
    missing = [n for n in DAEMONS + CLIENTS if _find(n) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; run the test as root (CI does)"
    return None


def _die_with_parent() -> None:
    """In the daemon, before exec: SIGTERM when the test process dies, even by SIGKILL (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class SlurmCluster:
    root: Path
    cpus: int
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def run(self, *cmd: str) -> str:
        proc = subprocess.run([_find(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True,
                              timeout=60)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def start(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._write_conf()
        r = self.root
        self._daemon("munged", "--foreground", "--force", f"--socket={r}/munge.sock", f"--key-file={key}",
                     f"--pid-file={r}/munged.pid", f"--log-file={r}/log/munged.log", f"--seed-file={r}/munged.seed")
        self._wait_for(lambda: (r / "munge.sock").exists(), "munged to create its socket", 20)
        self._daemon("slurmctld", "-D", "-i")
        self._daemon("slurmd", "-D")
        self._wait_for(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T"), "the node to become idle", 60)

    def _write_conf(self) -> None:
        r = self.root
        (r / "slurm.conf").write_text(f"""\
ClusterName=launchtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge.sock
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.stdio", "w")
        cmd = [_find(name) or name, *args]
        self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             preexec_fn=_die_with_parent))
        log.close()

    def _wait_for(self, ready: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}; logs in {self.root / 'log'}")
            try:
                if ready():
                    return
            except RuntimeError:
                pass  # the controller is still starting
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout_s} s for {what}; logs in {self.root / 'log'}")

    def stop(self) -> None:
        """Cancel every job (their processes are slurmd's children, which slurmd does not reap
        on exit), then stop the daemons in reverse order."""
        try:
            self.run("scancel", "--full", "--user=root")
            self._wait_for(lambda: not self.run("squeue", "-h").strip(), "the jobs to end", 60)
        except (RuntimeError, TimeoutError):
            pass  # stop the daemons regardless
        for proc in reversed(self.daemons):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ---- jobs -------------------------------------------------------------------------------
    def submit(self, script: Path) -> int:
        return int(self.run("sbatch", "--parsable", str(script)).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (only the simple KEY=VALUE fields are needed)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", str(job_id))))

    def wait_for_job(self, job_id: int, done: Callable[[dict[str, str]], bool], what: str,
                     timeout_s: float = 240) -> dict[str, str]:
        """Poll the job until done(job) holds; a job that ends otherwise fails at once."""
        info: dict[str, str] = {}

        def check() -> bool:
            nonlocal info
            info = self.job(job_id)
            if done(info):
                return True
            if info["JobState"] in TERMINAL_STATES:
                raise AssertionError(f"job {job_id} ended {info['JobState']} ({info.get('ExitCode')}) "
                                     f"while waiting for {what}")
            return False
        self._wait_for(check, f"job {job_id}: {what}", timeout_s)
        return info

    def release_requeued(self, job_id: int) -> None:
        """Slurm holds a requeued job back for 120 s (BeginTime); start it in 2 s instead. Not at
        once: slurmd refuses job credentials issued in the second the job's old one was revoked."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2")
