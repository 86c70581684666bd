"""The value rules accept what the schedulers document and nothing that could change a script."""
import pytest

from launch.validate import (K8S_IMAGE, K8S_JOB_NAME, K8S_NAMESPACE, K8S_PVC, SLURM_JOB_NAME, SLURM_PARTITION,
                             SLURM_RUN_DIR, SLURM_TIME, LaunchError, slurm_time_seconds)

CASES = [
    (K8S_IMAGE, ["hybrid-pretrain:latest", "nvcr.io/nvidia/pytorch:24.01-py3", "REGISTRY/hybrid-pretrain:TAG",
                 "localhost:5000/a/b_c/d__e", "ghcr.io/org/img@sha256:" + "0" * 64, "[::1]:5000/img:v1"],
     ["Img:1", "img:1 2", "img:-x", "img/:1", "img:1\nx", "", "img@sha256:abc", "img;ls"]),
    (K8S_JOB_NAME, ["pretrain", "hm1b-run2", "a"], ["Pretrain", "1b", "run-", "run_2", "run.2", "a" * 64]),
    (K8S_NAMESPACE, ["default", "ml-train", "0team"], ["ML", "-x", "a.b", "a" * 64]),
    (K8S_PVC, ["runs", "lustre.runs-1", "a" * 253], ["Runs", "runs.", ".runs", "a..b", "a" * 254, "runs\n"]),
    (SLURM_JOB_NAME, ["pretrain", "hm1b_run.2+x"], ["-x", "a b", "a\nb", "a'b", "a" * 129]),
    (SLURM_PARTITION, ["gpu", "gpu,gpu-long", "a_b.c"], ["gpu,", "gpu long", "gpu\n", ""]),
    (SLURM_TIME, ["30", "30:00", "24:00:00", "2-0", "2-12:30", "2-12:30:00", "UNLIMITED", "INFINITE"],
     ["1h", "1:2:3:4", "-5", "2-", "1:00:00\n", "infinite", ""]),
    (SLURM_RUN_DIR, ["/shared/runs/r 1", "/a$b(c)"], ["rel/dir", "/a%j", '/a"b', "/a\\b", "/a\nb", "/a\tb"]),
]


@pytest.mark.parametrize("rule, good, bad", CASES, ids=[str(i) for i in range(len(CASES))])
def test_rule_accepts_the_documented_forms_only(rule, good, bad):
    for value in good:
        assert rule.check("--opt", value) == value
    for value in bad:
        with pytest.raises(LaunchError, match="^--opt ") as e:
            rule.check("--opt", value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("limit, seconds", [
    ("30", 1800), ("30:15", 1815), ("2:00:01", 7201), ("1-2", 93600), ("1-2:03", 93780), ("1-0:0:5", 86405),
    ("UNLIMITED", float("inf")),
])
def test_slurm_time_limits_in_seconds(limit, seconds):
    assert slurm_time_seconds(limit) == seconds
