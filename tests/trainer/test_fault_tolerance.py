"""Exact resume after SIGKILL, SIGTERM preemption, and checkpoints that never finished."""
from __future__ import annotations

import random
import resource
import signal
import time
from pathlib import Path

import pytest
import torch

from free_port import free_port
from pretrain.checkpoint import verify_checkpoint
from pretrain.summary import read_summary
from pretrain.trainer import EXIT_PREEMPTED
from trainer_helpers import launch, losses, run_to_end, tiny_args, weights

STEPS = 14

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_to_end(tiny_args(run_dir, corpus, STEPS))
    return run_dir


def wait_for_step(proc, run_dir: Path, step: int) -> bool:
    """Poll metrics.jsonl until the run has logged `step`; False if the process ended first."""
    while proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir) or [0]) >= step:
            return True
        time.sleep(0.02)
    return False


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Every step logged once in metrics.jsonl, bitwise the reference's; the rows the resumed
    segments redid (set aside in metrics.superseded.jsonl) were the reference's too."""
    ref, got = losses(reference), losses(run_dir)
    assert got == {step: ref[step] for step in range(1, STEPS + 1)}
    redone = losses(run_dir, "metrics.superseded.jsonl") if (run_dir / "metrics.superseded.jsonl").exists() else {}
    for step, values in redone.items():
        assert all(v == ref[step][0] for v in values), (step, values, ref[step])  # bitwise
    final = f"checkpoints/step_{STEPS:08d}"
    a, b = weights(reference / final), weights(run_dir / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [(), ("--data.num_workers=1", "--checkpoint.async_save=true")],
                         ids=["in-process-loader", "loader-worker-async-save"])
def test_sigkill_at_random_steps_resumes_bitwise(corpus, reference, tmp_path, extra):
    """The data order does not depend on the number of loader workers, so both variants must
    reproduce the same reference run."""
    run_dir = tmp_path / "killed"
    for target in sorted(random.Random(1234).sample(range(2, STEPS - 1), 3)):
        proc = launch(tiny_args(run_dir, corpus, STEPS, *extra))
        reached = wait_for_step(proc, run_dir, target)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        # Each kill must land mid-run: a run that ended first (crashed, or finished) would write
        # summary.json, and a SIGKILL'd one writes nothing.
        assert reached and proc.returncode == -signal.SIGKILL, out[-3000:]
        assert not (run_dir / "summary.json").exists() and max(losses(run_dir)) < STEPS
    run_to_end(tiny_args(run_dir, corpus, STEPS, *extra))
    assert_same_run(run_dir, reference)
    assert read_summary(run_dir)["status"] == "finished"


def test_sigterm_saves_and_exits_for_requeue(corpus, reference, tmp_path):
    run_dir = tmp_path / "preempted"
    proc = launch(tiny_args(run_dir, corpus, STEPS, "--checkpoint.every=0"))
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and summary["exit_code"] == EXIT_PREEMPTED
    ckpt = Path(summary["checkpoint"])
    assert verify_checkpoint(ckpt) is None and ckpt.name == f"step_{summary['step']:08d}"
    assert 3 <= summary["step"] < STEPS
    run_to_end(tiny_args(run_dir, corpus, STEPS, "--checkpoint.every=0"))
    assert_same_run(run_dir, reference)


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has installed a handler for `sig` (Linux: SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_sigterm_while_importing_exits_for_requeue(corpus, tmp_path):
    """The entry point catches SIGTERM before it imports torch: a signal then (seconds before
    the first step) still ends in exit 75 and summary.json "preempted", never a bare 143."""
    run_dir = tmp_path / "early"
    proc = launch(tiny_args(run_dir, corpus, STEPS))
    while not catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and "SIGTERM during start-up" in summary["error"]
    assert not (run_dir / "metrics.jsonl").exists()


def listening(port: int) -> bool:
    """Whether some process listens on TCP `port` (Linux: /proc/net/tcp and tcp6, state 0A)."""
    rows = [r for table in ("tcp", "tcp6") for r in Path(f"/proc/net/{table}").read_text().splitlines()[1:]]
    return any(int(r.split()[1].split(":")[1], 16) == port and r.split()[3] == "0A" for r in rows)


def test_sigterm_while_blocked_in_the_rendezvous_exits_for_requeue(corpus, tmp_path):
    """Rank 0 of 2 waits in C++ for a rank that never comes (a node still starting), where Python
    cannot run its signal handler: the watcher thread still ends it with exit 75 and summary.json
    "preempted" within seconds, not when the rendezvous times out minutes later."""
    port = free_port()
    run_dir = tmp_path / "waiting"
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = launch(tiny_args(run_dir, corpus, STEPS), env=env)
    while not listening(port):  # the store is up: rank 0 now waits for rank 1
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert time.monotonic() - sent < 30
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and "SIGTERM during start-up" in summary["error"]


def test_sigterm_while_building_the_model_exits_for_requeue(corpus, tmp_path, monkeypatch):
    """A signal during start-up (here: the model build) raises at once - the process may be in a long
    build or a rendezvous - and main() still writes summary.json "preempted" and returns 75."""
    import os

    import pretrain.main as entry
    import pretrain.trainer as trainer_module
    from pretrain.preemption import PREEMPTION_SIGNALS, PreemptionWatch

    watch, build = PreemptionWatch(), trainer_module.build_model_from_config
    built = []

    def build_then_signal(cfg, device="cpu"):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while building
        built.append(device)
        return build(cfg, device)

    monkeypatch.setattr(entry, "PREEMPTION", watch)
    monkeypatch.setattr(trainer_module, "build_model_from_config", build_then_signal)
    previous = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    watch.install()
    try:
        code = entry.main(tiny_args(tmp_path, corpus, STEPS))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = read_summary(tmp_path)
    assert code == EXIT_PREEMPTED and not built  # the handler raised inside the build
    assert summary["status"] == "preempted" and summary["checkpoint"] is None
    assert not (tmp_path / "metrics.jsonl").exists()


def test_sigterm_to_every_process_with_loader_workers_saves_and_exits_for_requeue(corpus, tmp_path):
    """Schedulers signal the whole job (slurmstepd, a pod's TERM), data-loader workers included: a
    worker killed by it must not fail the run before it saves."""
    import os

    run_dir = tmp_path / "group"
    proc = launch(tiny_args(run_dir, corpus, STEPS, "--data.num_workers=2", "--checkpoint.every=0"),
                  start_new_session=True)
    assert wait_for_step(proc, run_dir, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and verify_checkpoint(Path(summary["checkpoint"])) is None


def files_up_to(size: int):
    """A child's pre-exec hook: writing a file past `size` bytes fails (EFBIG), as a write to a full
    disk does, without needing a small filesystem mounted."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_save_that_cannot_be_written_stops_in_one_line_and_keeps_the_earlier_checkpoints(corpus, tmp_path):
    """The tiny model's tensors (~6 MB) no longer fit: the run stops with one line (exit 1), the
    partial save is removed (it would keep a disk full), the step-2 checkpoint still resumes."""
    run_dir = tmp_path / "full"
    run_to_end(tiny_args(run_dir, corpus, 2))
    proc = launch(tiny_args(run_dir, corpus, 4), preexec_fn=files_up_to(1 << 20))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    [error] = [line for line in out.splitlines() if " ERROR " in line]
    assert "checkpoint " + str(run_dir / "checkpoints" / "step_00000004") + " could not be saved (OSError: [Errno 27] " \
           "File too large); its partial files are removed" in error and "earlier checkpoints are untouched" in error
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and summary["error"].startswith("CheckpointSaveFailed: checkpoint ")
    step2 = run_dir / "checkpoints" / "step_00000002"
    assert summary["checkpoint"] == str(step2) and verify_checkpoint(step2) is None


def test_sigterm_whose_save_fails_still_exits_for_requeue(corpus, tmp_path):
    """Preempted, and the save cannot be written: still exit 75 (the requeued run resumes from the
    last checkpoint, here none), with the save's failure in summary.json."""
    run_dir = tmp_path / "preempted"
    proc = launch(tiny_args(run_dir, corpus, STEPS, "--checkpoint.every=0"), preexec_fn=files_up_to(1 << 20))
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED and "Traceback" not in out, out[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and summary["checkpoint"] is None
    assert "; checkpoint " in summary["error"] and "could not be saved (OSError: [Errno 27] File too large)" in \
        summary["error"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
