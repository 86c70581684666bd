"""What the rendered Slurm script and Kubernetes manifests contain and how they decide to requeue."""
import os

import pytest

from launch.render import main
from launch.spec import REQUEUE_EXIT_CODE
from launch_helpers import container, manifests, render, run_pod_stubbed, run_slurm_script, sbatch_options

TRAIN = ["--arch", "hybrid_moe", "--size", "1b", "--optim.lr=6e-4"]


def test_slurm_script_requests_one_torchrun_per_node(tmp_path):
    text = render(tmp_path, ["slurm", "--nodes", "4", "--partition", "gpu", "--time", "2-00:00:00",
                             "--run-dir", "/shared/r 1", "--", *TRAIN])
    assert sbatch_options(text) == [
        "--job-name=pretrain", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=96", "--gpus-per-node=8",
        "--partition=gpu", "--time=2-00:00:00", "--requeue", "--open-mode=append",
        '--output="/shared/r 1/slurm-%j.out"', "--signal=USR1@360"]
    assert "export RUN_DIR='/shared/r 1'" in text and "TRAIN_ARGS=(--arch hybrid_moe --size 1b --optim.lr=6e-4)" in text


def test_slurm_script_starts_torchrun_with_the_rendezvous_from_slurm(tmp_path):
    run_dir = tmp_path / "run dir"
    text = render(tmp_path, ["slurm", "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "3",
                             "--python", "/opt/py env/bin/python", "--master-port", "1234", "--run-dir", str(run_dir),
                             "--", *TRAIN])
    ran = run_slurm_script(text, tmp_path, SLURM_JOB_NUM_NODES="2")
    assert ran.returncode == 0, ran.output
    assert ran.argv[1:] == [
        "--ntasks-per-node=1", "--cpus-per-task=12", "--kill-on-bad-exit=1",
        "/opt/py env/bin/python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=3",
        "--rdzv-backend=c10d", "--rdzv-endpoint=node1:1234", "--rdzv-id=42",
        "pretrain/main.py", "--run-dir", str(run_dir), *TRAIN]
    assert "--gpus-per-node" not in " ".join(sbatch_options(text))  # a CPU job asks for no GPUs


def test_k8s_job_maps_exit_codes_and_requests_resources(tmp_path):
    text = render(tmp_path, ["k8s", "--nodes", "2", "--gpus-per-node", "4", "--image", "reg.io/img:1",
                             "--run-dir", "/runs/r1", "--workdir", "/workspace", "--", *TRAIN])
    service, job = manifests(text)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": "pretrain"}
    spec = job["spec"]
    assert spec["completions"] == spec["parallelism"] == 2 and spec["completionMode"] == "Indexed"
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    rules = {(r["action"], tuple(r["onExitCodes"]["values"]) if "onExitCodes" in r else "conditions")
             for r in spec["podFailurePolicy"]["rules"]}
    assert rules == {("Ignore", "conditions"), ("Ignore", (REQUEUE_EXIT_CODE,)), ("FailJob", (2, 3))}
    assert spec["backoffLimit"] == 3 * 2  # 3 failures of the run, each failing both pods
    c = container(job)
    assert c["image"] == "reg.io/img:1" and c["workingDir"] == "/workspace" and c["args"] == TRAIN
    # torchrun waits --grace-s for the trainers' checkpoint; the pod gets 30 s more to report its exit.
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300" and "SIGUSR1" in env["PET_SIGNALS_TO_HANDLE"]
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 330
    assert c["resources"] == {"requests": {"cpu": "48", "nvidia.com/gpu": 4}, "limits": {"nvidia.com/gpu": 4}}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert mounts == {"run": "/runs", "dshm": "/dev/shm"}
    assert volumes["run"]["persistentVolumeClaim"] == {"claimName": "runs"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_k8s_pod_starts_torchrun_with_the_rendezvous_on_pod_0(tmp_path):
    text = render(tmp_path, ["k8s", "--nodes", "3", "--gpus-per-node", "2", "--job-name", "hm1b",
                             "--master-port", "1234", "--run-dir", "/runs/r1", "--", *TRAIN])
    ran = run_pod_stubbed(manifests(text)[1], tmp_path, run_dir=str(tmp_path / "run"))
    assert ran.returncode == 0, ran.output
    assert ran.argv[1:] == [
        "-m", "torch.distributed.run", "--nnodes=3", "--nproc-per-node=2", "--rdzv-backend=c10d",
        "--rdzv-endpoint=hm1b-0.hm1b:1234", "--rdzv-id=hm1b", "--rdzv-conf=is_host=1",
        "pretrain/main.py", "--run-dir", str(tmp_path / "run"), *TRAIN]


def test_requeue_code_is_the_trainers_preemption_exit_code():
    from pretrain.trainer import EXIT_PREEMPTED  # launch/ cannot import pretrain/, so check here

    assert REQUEUE_EXIT_CODE == EXIT_PREEMPTED


@pytest.mark.parametrize("argv, names", [
    (["k8s", "--nodes", "1", "--run-dir", "/elsewhere/r1"], "--run-mount"),
    (["slurm", "--nodes", "1", "--run-dir", "/r", "--", "--run-dir", "/x"], "--run-dir"),
    (["slurm", "--nodes", "0", "--run-dir", "/r"], "--nodes"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "0", "--run-dir", "/r"], "--procs-per-node"),
    (["slurm", "--nodes", "1", "--procs-per-node", "2", "--run-dir", "/r"], "--gpus-per-node"),
    (["slurm", "--nodes", "1", "--time", "5", "--run-dir", "/r"], "--signal-lead-s"),
    (["slurm", "--nodes", "1", "--run-dir", "relative/r"], "--run-dir"),
    (["k8s", "--nodes", "1", "--run-dir", "/runs/r", "--workdir", "repo"], "--workdir"),
    (["k8s", "--nodes", "100", "--job-name", "j" * 61, "--run-dir", "/runs/r"], "--job-name"),
    (["k8s", "--nodes", "1", "--master-port", "70000", "--run-dir", "/runs/r"], "--master-port"),
    (["k8s", "--nodes", "1", "--run-dir", "/runs/../etc/x"], "--run-dir '/runs/../etc/x': a path with '..'"),
    (["k8s", "--nodes", "1", "--run-dir", "/dev/shm/r", "--run-mount", "/dev/shm"], "--run-mount '/dev/shm'"),
    (["slurm", "--nodes", "1", "--time", "\u0662\u0664:00:00", "--run-dir", "/r"], "--time"),
    (["slurm", "--nodes", "1", "--time", "3-00:00:00", "--signal-lead-s", "70000", "--run-dir", "/r"],
     "--signal-lead-s"),
    (["slurm", "--nodes", "1", "--run-dir", "/r", "--", "--data", "\udcff"], "not valid UTF-8"),
    (["slurm", "--nodes", "1", "--run-dir", "/r", "--grace-s", "600"], "raise --signal-lead-s to 630"),
    (["slurm", "--nodes", "1", "--run-dir", "/r", "--grace-s", "60", "--signal-lead-s", "89"], "--grace-s 60"),
    (["k8s", "--nodes", "1", "--run-dir", "/runs/r", "--time", "1:00:00"], "--time is not a k8s option"),
    (["slurm", "--nodes", "1", "--run-dir", "/r", "--backoff-limit", "0"], "--backoff-limit is not a slurm option"),
    (["slurm", "--nodes", "1", "--run-dir", "/r", "--workdir=~/repo"], "'~' is not expanded"),
    (["k8s", "--nodes", "1", "--run-dir", "/runs/r", "--python", "~/venv/bin/python"], "'~' is not expanded"),
])
def test_bad_arguments_are_refused_with_one_line(tmp_path, capsys, argv, names):
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--out", str(tmp_path / "x"), *argv[1:]])
    message = capsys.readouterr().err
    assert e.value.code == 2 and message.count("\n") == 1 and names in message, message
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("status, trainer_rc, stale_summary, expect_rc", [
    ("preempted", 1, False, 0),    # torchrun reports the workers' exit 75 as 1: the summary decides
    ("preempted", 75, False, 0),
    ("", 75, False, 0),            # no summary (rank 0 killed before writing): the exit code still counts
    ("failed", 1, False, 1),
    ("stopped", 1, False, 3),      # the trainers' own code, not torchrun's 1
    ("config_error", 1, False, 2),
    ("", 1, True, 1),              # a preempted summary left by an earlier allocation does not count
])
def test_slurm_requeue_follows_the_run_summary(tmp_path, status, trainer_rc, stale_summary, expect_rc):
    run_dir = tmp_path / "run"
    if stale_summary:
        run_dir.mkdir()
        (run_dir / "summary.json").write_text('{\n  "exit_code": 75,\n  "status": "preempted"\n}\n')
        os.utime(run_dir / "summary.json", (0, 0))
    text = render(tmp_path, ["slurm", "--nodes", "1", "--run-dir", str(run_dir), "--", "--arch", "llama"])
    ran = run_slurm_script(text, tmp_path, srun_rc=trainer_rc, status=status)
    calls = tmp_path / "scontrol-calls"
    if expect_rc == 0:
        assert ran.returncode == 0 and calls.read_text().split() == ["requeue", "42"], ran.output
    else:
        assert ran.returncode == expect_rc and not calls.exists(), ran.output
    assert [p.name for p in run_dir.iterdir()] == (["summary.json"] if status or stale_summary else [])  # no marker


def test_a_summary_in_the_markers_timestamp_tick_is_this_runs(tmp_path):
    """On a filesystem with a coarse clock the summary can carry the launch marker's very mtime."""
    text = render(tmp_path, ["slurm", "--nodes", "1", "--run-dir", str(tmp_path / "run"), "--", "--arch", "llama"])
    ran = run_slurm_script(text, tmp_path, srun_rc=1, status="stopped", SAME_TICK="1")
    assert ran.returncode == 3, ran.output


def test_slurm_requeue_that_fails_is_said_and_exits_75(tmp_path):
    text = render(tmp_path, ["slurm", "--nodes", "1", "--run-dir", str(tmp_path / "run"), "--", "--arch", "llama"])
    ran = run_slurm_script(text, tmp_path, srun_rc=1, status="preempted", requeue_rc=1)
    assert ran.returncode == REQUEUE_EXIT_CODE, ran.output
    assert "scontrol requeue failed; the checkpoint is saved: sbatch this script again to resume" in ran.output


def test_an_unwritable_run_dir_stops_the_script_before_the_trainers(tmp_path):
    (tmp_path / "file").write_text("")
    text = render(tmp_path, ["slurm", "--nodes", "1", "--run-dir", str(tmp_path / "file" / "run"), "--", "--arch",
                             "llama"])
    ran = run_slurm_script(text, tmp_path, status="preempted")
    assert ran.returncode == 1 and ran.argv is None and "launch: cannot write to the run directory" in ran.output


@pytest.mark.parametrize("status, torchrun_rc, expect_rc", [
    ("preempted", 1, REQUEUE_EXIT_CODE),  # torchrun reports a worker's exit 75 as 1
    ("failed", 1, 1),
    ("stopped", 1, 3),                    # the podFailurePolicy fails the Job on 2 and 3
    ("config_error", 1, 2),
    ("", 1, 1),
    ("finished", 0, 0),
])
def test_k8s_pod_exit_code_follows_the_run_summary(tmp_path, status, torchrun_rc, expect_rc):
    text = render(tmp_path, ["k8s", "--nodes", "1", "--run-dir", "/runs/r1", "--", "--arch", "llama"])
    ran = run_pod_stubbed(manifests(text)[1], tmp_path, torchrun_rc, status, run_dir=str(tmp_path / "run"))
    assert ran.returncode == expect_rc, ran.output


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    for out in (tmp_path / "missing" / "job.sbatch", tmp_path):
        with pytest.raises(SystemExit) as e:
            main(["slurm", "--nodes", "1", "--run-dir", "/r", "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--out {out}: cannot write it" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no temp file left


def test_time_zero_is_no_limit_to_slurm(tmp_path):
    main(["slurm", "--nodes", "1", "--time", "0", "--run-dir", "/r", "--out", str(tmp_path / "job")])
    assert "#SBATCH --time=0" in (tmp_path / "job").read_text()
