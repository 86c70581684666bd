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
