import os
import shutil
import subprocess

import pytest
import yaml

from launch.render import REQUEUE_EXIT_CODE, main


def render(tmp_path, argv):
    out = tmp_path / "out"
    assert main([argv[0], "--out", str(out), *argv[1:]]) == 0
    return out.read_text()


def test_slurm_script_is_valid_bash_and_requeues(tmp_path):
    text = render(tmp_path, ["slurm", "--nodes", "4", "--partition", "gpu", "--run-dir", "/shared/r 1",
                             "--", "--arch", "hybrid_moe", "--size", "1b", "--optim.lr=6e-4"])
    assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=8" in text
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --signal=USR1@" in text and "--requeue" in text
    assert "pretrain/main.py --run-dir '/shared/r 1' --arch hybrid_moe --size 1b --optim.lr=6e-4" in text
    assert f'"$rc" -eq {REQUEUE_EXIT_CODE}' in text and "scontrol requeue" in text
    if shutil.which("bash"):
        script = tmp_path / "job.sbatch"
        script.write_text(text)
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_k8s_manifest_parses_and_maps_exit_codes(tmp_path):
    text = render(tmp_path, ["k8s", "--nodes", "2", "--gpus-per-node", "4", "--image", "img:1",
                             "--run-dir", "/runs/r1", "--", "--config", "configs/hybrid_moe_1b.toml"])
    service, job = list(yaml.safe_load_all(text))
    assert service["kind"] == "Service" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["completions"] == spec["parallelism"] == 2 and spec["completionMode"] == "Indexed"
    rules = spec["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and r.get("onExitCodes", {}).get("values") == [REQUEUE_EXIT_CODE] for r in rules)
    assert any(r["action"] == "Ignore" and r.get("onPodConditions") for r in rules)
    container = spec["template"]["spec"]["containers"][0]
    assert container["image"] == "img:1" and container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "--nnodes 2 --nproc-per-node 4" in container["args"][0]
    assert "pretrain/main.py --run-dir /runs/r1 --config configs/hybrid_moe_1b.toml" in container["args"][0]


def test_requeue_code_is_the_trainers_preemption_exit_code():
    from pretrain.trainer import EXIT_PREEMPTED  # launch/ cannot import pretrain/, so check here

    assert REQUEUE_EXIT_CODE == EXIT_PREEMPTED


@pytest.mark.parametrize("argv", [
    ["k8s", "--nodes", "1", "--run-dir", "/elsewhere/r1"],
    ["slurm", "--nodes", "1", "--run-dir", "/r", "--", "--run-dir", "/x"],
    ["slurm", "--nodes", "0", "--run-dir", "/r"],
])
def test_bad_arguments_are_refused(tmp_path, argv):
    with pytest.raises(SystemExit):
        main([argv[0], "--out", str(tmp_path / "x"), *argv[1:]])


def fake_commands(tmp_path, name, body):
    """A directory to put first on PATH with one fake command (a bash script)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    cmd = bin_dir / name
    cmd.write_text("#!/bin/bash\n" + body)
    cmd.chmod(0o755)
    return bin_dir


SUMMARY_WRITER = 'mkdir -p "$RUN_DIR" && printf \'{\\n  "status": "%s"\\n}\\n\' "$STATUS" > "$RUN_DIR/summary.json"\n'


@pytest.mark.parametrize("status, trainer_rc, stale_summary, requeued", [
    ("preempted", 137, False, True),  # srun killed the other ranks after rank 0's exit 75: summary decides
    ("preempted", 75, False, True),
    ("", 75, False, True),            # no summary (rank 0 killed before writing): the exit code still counts
    ("failed", 1, False, False),
    ("", 1, True, False),             # a preempted summary left by an earlier allocation does not count
])
def test_slurm_requeue_follows_the_run_summary(tmp_path, status, trainer_rc, stale_summary, requeued):
    run_dir = tmp_path / "run"
    if stale_summary:
        run_dir.mkdir()
        (run_dir / "summary.json").write_text('{\n  "status": "preempted"\n}\n')
        os.utime(run_dir / "summary.json", (0, 0))
    script = tmp_path / "job.sbatch"
    script.write_text(render(tmp_path, ["slurm", "--nodes", "1", "--run-dir", str(run_dir), "--", "--arch", "llama"]))
    bin_dir = fake_commands(tmp_path, "srun", (SUMMARY_WRITER if status else "") + f"exit {trainer_rc}\n")
    fake_commands(tmp_path, "scontrol", 'if [ "$1" = show ]; then echo node1; else echo "$@" >> "$CALLS"; fi\n')
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": str(run_dir), "STATUS": status,
           "CALLS": str(calls), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node1"}
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    if requeued:
        assert proc.returncode == 0 and calls.read_text().split() == ["requeue", "42"], proc.stdout + proc.stderr
    else:
        assert proc.returncode == trainer_rc and not calls.exists(), proc.stdout + proc.stderr


@pytest.mark.parametrize("status, torchrun_rc, expect_rc", [
    ("preempted", 1, REQUEUE_EXIT_CODE),  # torchrun reports a worker's exit 75 as 1
    ("failed", 1, 1),
    ("finished", 0, 0),
])
def test_k8s_container_exit_code_follows_the_run_summary(tmp_path, status, torchrun_rc, expect_rc):
    run_dir = "/runs/r1"
    text = render(tmp_path, ["k8s", "--nodes", "1", "--run-dir", run_dir, "--", "--arch", "llama"])
    container = list(yaml.safe_load_all(text))[1]["spec"]["template"]["spec"]["containers"][0]
    local_run = tmp_path / "run"
    command = container["args"][0].replace(run_dir, str(local_run))  # the shared volume, here a local dir
    bin_dir = fake_commands(tmp_path, "torchrun", SUMMARY_WRITER + f"exit {torchrun_rc}\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": str(local_run), "STATUS": status,
           "JOB_COMPLETION_INDEX": "0"}
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
