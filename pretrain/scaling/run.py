"""`run`: train every point of a plan, locally one after another or as rendered cluster jobs.

Resumable by construction: a point whose run dir holds a finished `summary.json` at the planned
step is skipped; any other point is (re)started with the same config, and `pretrain/main.py`
resumes it from its newest verified checkpoint. SIGTERM / SIGUSR1 to a local `run` preempt the point
in training (it checkpoints and exits 75); a preempted point stops the loop, and the next `run`
continues where it stopped.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from pretrain.scaling.plan import PlanError, Point

REPO = Path(__file__).resolve().parents[2]
EXIT_PREEMPTED = 75


def read_point_summary(point: Point) -> dict:
    """The point's summary.json ({} before its run wrote one); a damaged one is named."""
    path = Path(point.run_dir) / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except ValueError as e:
        raise PlanError(f"{path}: not a run summary ({e}); move it aside and run the point again") from None
    if not isinstance(summary, dict):
        raise PlanError(f"{path}: not a run summary (a JSON {type(summary).__name__}); move it aside and run the "
                        "point again")
    return summary


def finished(point: Point) -> bool:
    s = read_point_summary(point)
    return s.get("status") == "finished" and s.get("step") == point.steps


def trainer_command(point: Point, nproc: int) -> list[str]:
    main = str(REPO / "pretrain" / "main.py")
    if nproc == 1:
        return [sys.executable, main, "--config", point.config]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", main,
            "--config", point.config]


def run_local(points: list[Point], nproc: int = 1, log=print) -> dict[str, str]:
    """point id -> 'skipped' | 'finished' | 'preempted' | 'failed (exit N)'; stops at a preemption."""
    outcome: dict[str, str] = {}
    for point in points:
        if finished(point):
            outcome[point.id] = "skipped"
            log(f"{point.id}: already finished, skipped")
            continue
        log(f"{point.id}: training {point.steps} steps ({point.tokens:,} tokens)")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        logfile = Path(point.run_dir).parent / f"{point.id}.out"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a") as out:
            rc = run_forwarding_signals(trainer_command(point, nproc), env, out)
        if rc == 0 and finished(point):
            outcome[point.id] = "finished"
        elif rc == EXIT_PREEMPTED:
            outcome[point.id] = "preempted"
            log(f"{point.id}: preempted (checkpoint saved); run again to resume")
            break
        else:
            outcome[point.id] = f"failed (exit {rc})"
            log(f"{point.id}: failed with exit {rc}; see {logfile}")
    return outcome


def run_forwarding_signals(cmd: list[str], env: dict[str, str], out) -> int:
    """Run the trainer; SIGTERM / SIGUSR1 sent to this process reach it, so preempting a local sweep
    checkpoints the current point (exit 75) as a cluster's preemption would. On Ctrl-C the trainer
    gets SIGTERM (if the interrupt did not already end it) and is waited for: no trainer outlives
    `run`, so a second `run` never trains the same point beside it."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    forwarded = (signal.SIGTERM, signal.SIGUSR1)
    previous = {sig: signal.signal(sig, lambda signum, _frame: proc.send_signal(signum)) for sig in forwarded}
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached this process, perhaps not the trainer: preempt it, wait for it
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def render_jobs(points: list[Point], target: str, plan_dir: Path, launch_args: list[str]) -> Path:
    """One `python -m launch.render TARGET` file per unfinished point under PLAN/TARGET/, and
    submit.sh, which submits them (sbatch / kubectl apply). Returns submit.sh."""
    job_dir = plan_dir / target
    job_dir.mkdir(parents=True, exist_ok=True)
    suffix, submit = (".sbatch", "sbatch") if target == "slurm" else (".yaml", "kubectl apply -f")
    lines = ["#!/bin/bash", "# submits every point of the scaling plan not finished when this was rendered",
             "set -euo pipefail", 'cd "$(dirname "$0")"']
    for point in points:
        if finished(point):
            continue
        job = job_dir / f"{point.id}{suffix}"
        cmd = [sys.executable, "-m", "launch.render", target, *launch_args, "--job-name", job_name(point.id),
               "--run-dir", point.run_dir, "--out", str(job), "--", "--config", point.config]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PlanError(f"launch.render {target} for {point.id}: {proc.stderr.strip() or proc.stdout.strip()}")
        lines.append(f"{submit} {job.name}")
    script = job_dir / "submit.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return script


def job_name(point_id: str) -> str:
    """A name Slurm and Kubernetes both accept (lowercase alphanumerics and '-', at most 63)."""
    return "".join(c if c.isalnum() else "-" for c in point_id.lower())[:63].strip("-")
