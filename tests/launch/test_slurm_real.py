"""The rendered batch script under a real Slurm (one localhost node, 2 CPUs): two gloo ranks of
the tiny trainer through torchrun's c10d rendezvous; preemption by `scancel --signal=USR1`, the
script's own requeue, and the resume from the preemption checkpoint on 2 ranks and on 1.

Skipped (with the reason) only where Slurm is not installed or the test is not root; .ci/run
installs Slurm and sets LAUNCH_REQUIRE_SLURM=1, which turns that skip into a failure.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from launch.render import main as render
from launch_helpers import logged_steps
from free_port import free_port
from slurm_cluster import SlurmCluster, unavailable_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 24
PREEMPT_AFTER = 8  # steps logged before the USR1; the trainers stop at the next step boundary


@pytest.fixture
def slurm(tmp_path_factory) -> SlurmCluster:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("LAUNCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"LAUNCH_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def batch_script(tmp_path: Path, corpus: Path, run_dir: Path, ranks: int) -> Path:
    """A rendered script for this machine; the run directory has a space, as #SBATCH --output must cope."""
    run_dir.mkdir(parents=True, exist_ok=True)
    script = tmp_path / f"job-{ranks}.sbatch"
    render(["slurm", "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", str(ranks), "--cpus-per-rank", "1",
            "--omp-threads", "1", "--time", "10", "--signal-lead-s", "90", "--grace-s", "60",
            "--master-port", str(free_port()), "--workdir", str(REPO), "--python", sys.executable,
            "--job-name", "tiny", "--run-dir", str(run_dir), "--out", str(script), "--",
            "--arch", "hybrid_moe", "--size", "tiny", "--data", str(corpus), "--data.seq_len=32",
            "--train.micro_batch_size=4", "--train.global_batch_tokens=256", f"--train.steps={STEPS}",
            "--train.device=cpu", "--train.dtype=fp32", "--optim.lr=3e-3", "--logging.log_every=1",
            "--logging.tensorboard=false", "--data.num_streams=8", "--train.val_every=0", "--checkpoint.every=0"])
    return script


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def job_output(run_dir: Path, job_id: int) -> str:
    return (run_dir / f"slurm-{job_id}.out").read_text()


def completed(job: dict[str, str]) -> bool:
    return job["JobState"] == "COMPLETED"


def preempt(slurm: SlurmCluster, job_id: int, run_dir: Path) -> dict:
    """USR1 to the job's steps once training is under way; returns the summary of the preempted
    run once the script has requeued the job (Slurm then holds it back, pending)."""
    slurm.wait_for_job(job_id, lambda _: len(logged_steps(run_dir)) >= PREEMPT_AFTER, f"step {PREEMPT_AFTER}")
    slurm.run("scancel", "--signal=USR1", str(job_id))
    slurm.wait_for_job(job_id, lambda j: j["JobState"] == "PENDING" and j["Restarts"] == "1", "its requeue")
    return summary(run_dir)


def test_batch_script_under_real_slurm(slurm, corpus, tmp_path):
    """Three jobs, one after another on the one node (a single test, so that pytest-xdist cannot
    split them over two workers, each starting a cluster of its own)."""
    reference_loss = uninterrupted_job_trains_two_ranks_to_the_end(slurm, corpus, tmp_path / "reference")
    preempted_job_requeues_itself_and_resumes_to_the_same_loss(slurm, corpus, tmp_path / "requeue", reference_loss)
    requeued_run_resumes_on_fewer_ranks(slurm, corpus, tmp_path / "elastic", reference_loss)


def uninterrupted_job_trains_two_ranks_to_the_end(slurm: SlurmCluster, corpus: Path, tmp: Path) -> float:
    run_dir = tmp / "run dir"
    job_id = slurm.submit(batch_script(tmp, corpus, run_dir, ranks=2))
    job = slurm.wait_for_job(job_id, completed, "completion")
    out = job_output(run_dir, job_id)
    assert job["ExitCode"] == "0:0" and job["Restarts"] == "0"
    s = summary(run_dir)
    assert s["status"] == "finished" and s["step"] == STEPS and s["world_size"] == 2
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert "on 1 node(s) x 2 rank(s)" in out and "launch: trainers exited 0" in out, out[-3000:]
    return s["last_train_loss"]


def preempted_job_requeues_itself_and_resumes_to_the_same_loss(slurm: SlurmCluster, corpus: Path, tmp: Path,
                                                               reference_loss: float) -> None:
    run_dir = tmp / "run dir"
    job_id = slurm.submit(batch_script(tmp, corpus, run_dir, ranks=2))
    preempted = preempt(slurm, job_id, run_dir)
    assert preempted["status"] == "preempted" and preempted["exit_code"] == 75, preempted
    stopped_at = preempted["step"]
    assert PREEMPT_AFTER <= stopped_at < STEPS and preempted["checkpoint"].endswith(f"step_{stopped_at:08d}")

    slurm.release_requeued(job_id)
    job = slurm.wait_for_job(job_id, completed, "the requeued run to finish")
    out = job_output(run_dir, job_id)
    assert job["Restarts"] == "1" and job["ExitCode"] == "0:0"
    assert f"launch: preempted; requeueing job {job_id}" in out and f"job {job_id} (restart 1)" in out, out[-3000:]
    assert f"at step {stopped_at} (saved by 2 rank(s), now 2)" in out, out[-3000:]
    s = summary(run_dir)
    assert s["status"] == "finished" and s["step"] == STEPS
    assert s["last_train_loss"] == reference_loss  # bitwise: same ranks, exact resume
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # no step lost or trained twice


def requeued_run_resumes_on_fewer_ranks(slurm: SlurmCluster, corpus: Path, tmp: Path, reference_loss: float) -> None:
    """The user cancels the requeued 2-rank job and resubmits the run on 1 rank: DCP reshards the
    checkpoint and the loader redistributes its streams, so the data order and the losses match."""
    run_dir = tmp / "run dir"
    first = slurm.submit(batch_script(tmp, corpus, run_dir, ranks=2))
    stopped_at = preempt(slurm, first, run_dir)["step"]
    slurm.run("scancel", str(first))
    second = slurm.submit(batch_script(tmp, corpus, run_dir, ranks=1))
    slurm.wait_for_job(second, completed, "the 1-rank run to finish")
    out = job_output(run_dir, second)
    assert "on 1 node(s) x 1 rank(s)" in out and f"at step {stopped_at} (saved by 2 rank(s), now 1)" in out, out[-3000:]
    s = summary(run_dir)
    assert s["status"] == "finished" and s["step"] == STEPS and s["world_size"] == 1
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    # Same batches, summed in another order: equal up to float32 rounding, not necessarily bitwise.
    assert s["last_train_loss"] == pytest.approx(reference_loss, rel=1e-4)
