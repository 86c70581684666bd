"""Values an adversary (or a typo) might pass: each is refused with one line naming its option, or
rendered inert. Inert means: the Slurm script, run with stub srun/scontrol, and the pod command,
run with a stub torchrun, start no injected command and hand the value over verbatim; the #SBATCH
options and the manifests (which must still match the Kubernetes schema) gain no key.

The first ten got through the old text templates (issue 9); the rest probe the same paths.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from launch.render import main
from launch_helpers import (container, manifests, render, run_pod_stubbed, run_slurm_script, sbatch_options,
                            validate_manifest)

PRIVILEGED = "securityContext: {privileged: true}"
# {M}: a file that exists only if an injected command ran; {T}: the test's directory.
HOSTILE = [
    # target, option (None: a trainer argument), value, refused?
    ("slurm", "--workdir", "/tmp; touch {M}", False),
    ("slurm", "--python", "true; touch {M} #", False),
    ("slurm", "--job-name", "x\ntouch {M}", True),
    ("slurm", "--partition", "gpu\ntouch {M}", True),
    ("slurm", "--time", "1:00:00\ntouch {M}", True),
    ("k8s", "--image", f"img:1\n          {PRIVILEGED}", True),
    ("k8s", "--workdir", f"/w\n        {PRIVILEGED}", True),
    ("k8s", "--namespace", "default\n  labels: {evil: x}", True),
    ("k8s", "--pvc", "runs\n        hostPath: {path: /}", True),
    ("k8s", None, f"--x\n        - {PRIVILEGED}", False),
    ("slurm", "--job-name", "x --wrap='touch {M}'", True),
    ("slurm", "--partition", "gpu --wrap=x", True),
    ("slurm", "--run-dir", "{T}/r$(touch {M})", False),
    ("slurm", "--run-dir", "{T}/r\"\n#SBATCH --wrap=x", True),
    ("slurm", "--run-dir", "{T}/r\ntouch {M}", True),
    ("slurm", "--workdir", "{T}\ntouch {M}", True),
    ("slurm", "--python", "python\ntouch {M}", True),
    ("slurm", None, "--x=$(touch {M})", False),
    ("slurm", None, "'; touch {M}; '", False),
    ("slurm", None, "a\ntouch {M}", False),
    ("k8s", "--job-name", "x\n  labels: {evil: x}", True),
    ("k8s", "--run-dir", "/runs/r\n  evil: x", True),
    ("k8s", "--image", "img:1 $(touch {M})", True),
    ("k8s", "--python", "python; touch {M}", False),
    ("k8s", None, "--x=$(touch {M}) `touch {M}`", False),
    ("k8s", None, '"; touch {M}; "', False),
]
TRAIN = ["--arch", "llama"]


def argv_for(target: str, option: str | None, value: str, run_dir: str) -> list[str]:
    base = {"slurm": ["slurm", "--nodes", "1", "--gpus-per-node", "2", "--run-dir", run_dir],
            "k8s": ["k8s", "--nodes", "2", "--gpus-per-node", "2", "--run-dir", "/runs/r"]}[target]
    if option is None:
        return [*base, "--", *TRAIN, value]
    if option == "--run-dir":
        base = base[:-2]
    return [*base, option, value, "--", *TRAIN]


def keys(doc: object) -> set[str]:
    """Every mapping key anywhere in a parsed manifest."""
    if isinstance(doc, dict):
        return set(doc) | set().union(*(keys(v) for v in doc.values()))
    if isinstance(doc, list):
        return set().union(*(keys(v) for v in doc))
    return set()


def check_slurm_inert(text: str, tmp_path: Path, option: str | None, value: str, run_dir: str) -> None:
    assert [o.split("=")[0] for o in sbatch_options(text)] == [
        "--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--gpus-per-node", "--time", "--requeue",
        "--open-mode", "--output", "--signal"]
    ran = run_slurm_script(text, tmp_path)
    if option == "--workdir":  # `cd` into a directory of that odd name fails: nothing runs
        assert ran.returncode == 1 and ran.argv is None, ran.output
        return
    assert ran.returncode == 0, ran.output
    trainer_args = ran.argv[ran.argv.index("pretrain/main.py") + 1:]
    if option is None:
        assert trainer_args == ["--run-dir", run_dir, *TRAIN, value]
    elif option == "--run-dir":
        assert trainer_args == ["--run-dir", value, *TRAIN] and Path(value).is_dir()
    elif option == "--python":
        assert ran.argv[4] == value and ran.argv[5:7] == ["-m", "torch.distributed.run"]


def check_k8s_inert(text: str, tmp_path: Path, option: str | None, value: str) -> None:
    service, job = manifests(text)
    for doc in (service, job):
        validate_manifest(doc)
    plain = manifests(render(tmp_path, argv_for("k8s", None, "--plain", "")))
    assert (keys(service), keys(job)) == (keys(plain[0]), keys(plain[1]))
    ran = run_pod_stubbed(job, tmp_path, run_dir=str(tmp_path / "run"))
    if option == "--python":  # not an executable of that odd name: the pod fails, nothing runs
        assert {"name": "PYTHON", "value": value} in container(job)["env"]
        assert ran.returncode == 127 and ran.argv is None, ran.output
        return
    assert ran.returncode == 0, ran.output
    assert container(job)["args"] == [*TRAIN, value]
    assert ran.argv[ran.argv.index("pretrain/main.py") + 3:] == [*TRAIN, value]


@pytest.mark.parametrize("target, option, value, refused", HOSTILE,
                         ids=[f"{t}{o or ' train-arg'}-{i}" for i, (t, o, _, _) in enumerate(HOSTILE)])
def test_hostile_value_is_refused_or_inert(tmp_path, capsys, target, option, value, refused):
    marker = tmp_path / "INJECTED"
    value = value.replace("{M}", str(marker)).replace("{T}", str(tmp_path))
    run_dir = str(tmp_path / "run")
    argv = argv_for(target, option, value, run_dir)
    if refused:
        with pytest.raises(SystemExit) as e:
            main([argv[0], "--out", str(tmp_path / "out"), *argv[1:]])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and option in err, err
        return
    text = render(tmp_path, argv)
    if target == "slurm":
        check_slurm_inert(text, tmp_path, option, value, run_dir)
    else:
        check_k8s_inert(text, tmp_path, option, value)
    assert not marker.exists(), "an injected command ran"
