"""Rendered manifests match the Kubernetes API schema of their kinds (offline, unknown fields
refused), round-trip through YAML unchanged, and the pod command trains for real when run here:
2 gloo ranks under torchrun's c10d rendezvous, SIGTERM to the pod's shell -> checkpoint and exit 75,
and the recreated pod (the same command again) resumes to the end."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from launch.k8s import build_manifests
from launch.render import parse, scheduler_options, spec_from_args
from launch.spec import REQUEUE_EXIT_CODE
from launch_helpers import container, logged_steps, manifests, pod_command, render, validate_manifest
from free_port import free_port

REPO = Path(__file__).resolve().parents[2]
STEPS = 24

RENDERS = {
    "defaults": ["--nodes", "1", "--run-dir", "/runs/r1"],
    "gpu-nodes": ["--nodes", "16", "--gpus-per-node", "8", "--image", "nvcr.io/team/hybrid-pretrain:2.1",
                  "--namespace", "ml-train", "--pvc", "lustre.runs", "--run-mount", "/mnt/runs",
                  "--run-dir", "/mnt/runs/hm1b", "--workdir", "/workspace", "--job-name", "hm1b-run2",
                  "--shm-gib", "128", "--backoff-limit", "0", "--", "--config", "configs/hybrid_moe_1b.toml"],
    "cpu-nodes": ["--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "4",
                  "--image", "localhost:5000/hp@sha256:" + "ab" * 32, "--run-dir", "/runs/r", "--", "--arch", "llama"],
}


@pytest.mark.parametrize("name", RENDERS)
def test_manifest_matches_the_api_schema_and_round_trips(tmp_path, name):
    argv = ["k8s", *RENDERS[name]]
    docs = list(yaml.safe_load_all(render(tmp_path, argv)))
    args, train_args = parse(argv)
    assert docs == build_manifests(spec_from_args(args, train_args), scheduler_options(args))  # YAML changed nothing
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    for doc in docs:
        validate_manifest(doc)


def test_schema_check_refuses_unknown_fields_and_wrong_types(tmp_path):
    """The validator is not vacuous: a key Kubernetes does not know, or a count given as text, fails."""
    _, job = manifests(render(tmp_path, ["k8s", *RENDERS["defaults"]]))
    validate_manifest(job)
    unknown = copy.deepcopy(job)
    container(unknown)["privileged"] = True
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["completions"] = "2"
    for bad in (unknown, wrong_type):
        with pytest.raises(jsonschema.ValidationError):
            validate_manifest(bad)


def tiny_pod(tmp_path: Path, corpus: Path) -> tuple[list[str], dict[str, str], Path]:
    """The pod command and environment of a 1-node, 2-rank CPU job, with the volume mounted at
    tmp_path/runs, and the run directory."""
    run_dir = tmp_path / "runs" / "tiny"
    _, job = manifests(render(tmp_path, [
        "k8s", "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2", "--omp-threads", "1",
        "--job-name", "tiny", "--run-mount", str(tmp_path / "runs"), "--run-dir", str(run_dir),
        "--workdir", str(REPO), "--python", sys.executable, "--master-port", str(free_port()), "--grace-s", "60", "--",
        "--arch", "hybrid_moe", "--size", "tiny", "--data", str(corpus), "--data.seq_len=32",
        "--train.micro_batch_size=4", f"--train.steps={STEPS}", "--train.device=cpu", "--train.dtype=fp32",
        "--logging.log_every=1", "--logging.tensorboard=false", "--data.num_streams=8", "--train.val_every=0",
        "--checkpoint.every=0"]))
    assert container(job)["workingDir"] == str(REPO)  # where the kubelet starts the command
    cmd, env = pod_command(job)
    # What the cluster provides: the Job's index, and DNS for pod 0's name (here, this machine).
    env.update(JOB_COMPLETION_INDEX="0", MASTER_ADDR="127.0.0.1")
    return cmd, {**os.environ, **env}, run_dir


@pytest.mark.slow
def test_pod_command_trains_checkpoints_on_sigterm_and_resumes(tmp_path, corpus):
    cmd, env, run_dir = tiny_pod(tmp_path, corpus)
    pod = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while len(logged_steps(run_dir)) < 6 and pod.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    pod.send_signal(signal.SIGTERM)  # what the kubelet sends to the container's PID 1 on eviction
    out, _ = pod.communicate(timeout=180)
    assert pod.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    assert "launch: SIGTERM, passed on" in out and "launch: preempted" in out, out[-3000:]
    preempted = json.loads((run_dir / "summary.json").read_text())
    assert preempted["status"] == "preempted" and preempted["world_size"] == 2

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"at step {preempted['step']} (saved by 2 rank(s), now 2)" in again.stdout + again.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
