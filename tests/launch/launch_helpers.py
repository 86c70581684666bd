"""Helpers for the launcher tests: render through the CLI, fake commands on PATH, and run a
rendered Slurm script or pod command the way the scheduler would (with stubs for srun and torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import yaml

from launch.render import main

ARGV_FILE = "argv"  # where the stubs record the argument vector they were started with


def render(tmp_path: Path, argv: list[str]) -> str:
    out = tmp_path / f"rendered-{argv[0]}"
    assert main([argv[0], "--out", str(out), *argv[1:]]) == 0
    return out.read_text()


def fake_command(bin_dir: Path, name: str, body: str) -> Path:
    """A bash script called NAME in bin_dir (put bin_dir first on PATH)."""
    bin_dir.mkdir(exist_ok=True)
    cmd = bin_dir / name
    cmd.write_text("#!/bin/bash\n" + body)
    cmd.chmod(0o755)
    return bin_dir


# Records its argv (NUL-separated, so any argument survives) and optionally writes summary.json
# as the trainers' rank 0 does (json.dumps(indent=2, sort_keys=True)), with the status's exit code.
RECORD_ARGV = f'printf "%s\\0" "$0" "$@" > "$STUB_DIR/{ARGV_FILE}"\n'
EXIT_CODES = {"finished": 0, "failed": 1, "config_error": 2, "stopped": 3, "preempted": 75}
SUMMARY_WRITER = ('[ -n "${STATUS:-}" ] && mkdir -p "$RUN_DIR" && printf \'{\\n  "exit_code": %s,\\n  '
                  '"status": "%s"\\n}\\n\' "$SUMMARY_EXIT_CODE" "$STATUS" > "$RUN_DIR/summary.json"\n'
                  # SAME_TICK: the summary gets the launch marker's very timestamp (a coarse filesystem clock)
                  '[ -n "${SAME_TICK:-}" ] && touch -r "$RUN_DIR"/.launch-started.* "$RUN_DIR/summary.json"\n')


def summary_env(status: str) -> dict[str, str]:
    return {"STATUS": status, "SUMMARY_EXIT_CODE": str(EXIT_CODES.get(status, ""))}


@dataclass
class Ran:
    returncode: int
    output: str
    argv: list[str] | None  # what the stubbed launcher received; None when it never ran


def run_stubbed(cmd: list[str], tmp_path: Path, stubs: dict[str, str], env: dict[str, str]) -> Ran:
    """Run cmd with fake commands first on PATH; returns what the launcher stub saw."""
    bin_dir = tmp_path / "bin"
    for name, body in stubs.items():
        fake_command(bin_dir, name, body)
    argv_file = tmp_path / ARGV_FILE
    argv_file.unlink(missing_ok=True)
    full_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60)
    argv = argv_file.read_bytes().decode().split("\0")[:-1] if argv_file.exists() else None
    return Ran(proc.returncode, proc.stdout + proc.stderr, argv)


SLURM_ENV = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
             "SLURM_CPUS_PER_TASK": "12"}


def run_slurm_script(text: str, tmp_path: Path, srun_rc: int = 0, status: str = "", requeue_rc: int = 0,
                     **env: str) -> Ran:
    """bash the batch script with srun and scontrol stubbed; scontrol calls other than
    `show hostnames` are appended to $STUB_DIR/scontrol-calls and exit `requeue_rc`."""
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    stubs = {"srun": RECORD_ARGV + SUMMARY_WRITER + f"exit {srun_rc}\n",
             "scontrol": 'if [ "$1" = show ]; then echo node1; exit 0; fi\n'
                         f'echo "$@" >> "$STUB_DIR/scontrol-calls"; exit {requeue_rc}\n'}
    return run_stubbed(["bash", str(script)], tmp_path, stubs, {**SLURM_ENV, **summary_env(status), **env})


def sbatch_options(text: str) -> list[str]:
    """The #SBATCH options sbatch reads: those before the first line that is not a comment."""
    options = []
    for line in text.splitlines()[1:]:
        if line and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            options.append(line.removeprefix("#SBATCH "))
    return options


# The oldest Kubernetes the manifests support (podFailurePolicy on by default, its schema final)
# and the newest whose schema kubernetes-validate bundles (offline).
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def validate_manifest(doc: dict) -> None:
    """Raises unless doc matches the Kubernetes API schema of its kind, unknown fields refused."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def manifests(text: str) -> tuple[dict, dict]:
    service, job = yaml.safe_load_all(text)
    return service, job


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def pod_command(job: dict) -> tuple[list[str], dict[str, str]]:
    """The trainer container's argv and environment, as the kubelet would start them."""
    c = container(job)
    return [*c["command"], *c.get("args", [])], {e["name"]: e["value"] for e in c["env"]}


def run_pod_stubbed(job: dict, tmp_path: Path, torchrun_rc: int = 0, status: str = "", run_dir: str | None = None
                    ) -> Ran:
    """The pod command with `python` stubbed (it stands for torchrun); run_dir replaces the
    manifest's (the shared volume, here a local directory)."""
    cmd, env = pod_command(job)
    env.update(JOB_COMPLETION_INDEX="0", **summary_env(status), **({"RUN_DIR": run_dir} if run_dir else {}))
    return run_stubbed(cmd, tmp_path, {"python": RECORD_ARGV + SUMMARY_WRITER + f"exit {torchrun_rc}\n"}, env)


def logged_steps(run_dir: Path) -> list[int]:
    """The steps in RUN_DIR/metrics.jsonl, in order; a line still being written is left out."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            continue
    return steps
