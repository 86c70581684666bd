"""Kubernetes manifests built as data and written by PyYAML, so no value can add a key or a line.

An Indexed Job (one pod per node, pod i reachable as JOB-i.JOB through a headless Service) whose
pods each run one torchrun; the trainers meet at a c10d rendezvous hosted by pod 0. A
podFailurePolicy recreates pods that were preempted or evicted (DisruptionTarget) or that exited
75 (checkpoint saved, requeue me) without counting them against backoffLimit, and fails the Job on
2 (bad configuration) and 3 (stopped by a guard). Needs Kubernetes >= 1.29 and a ReadWriteMany
PersistentVolumeClaim holding data and run directory (every rank writes its checkpoint shards).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml

from launch.spec import REQUEUE_EXIT_CODE, LaunchSpec, node_script
from launch.validate import (ABS_PATH, K8S_IMAGE, K8S_JOB_NAME, K8S_NAMESPACE, K8S_PVC, LaunchError, check_under)

CONTAINER = "trainer"
SHM_MOUNT = "/dev/shm"  # a memory volume: dataloader workers and NCCL need more than the default 64 MiB
EXIT_MARGIN_S = 30  # after torchrun's wait of --grace-s, time for the pod's shell to report its exit code


@dataclass(frozen=True)
class K8sOptions:
    image: str = "hybrid-pretrain:latest"
    namespace: str = "default"
    pvc: str = "runs"
    run_mount: str = "/runs"
    backoff_limit: int = 3
    shm_gib: int = 64


def _check(spec: LaunchSpec, opts: K8sOptions) -> None:
    # Pod hostnames are JOB-INDEX and must stay a 63-character DNS label.
    K8S_JOB_NAME.check("--job-name", spec.job_name, max_len=63 - len(f"-{spec.nodes - 1}"))
    K8S_NAMESPACE.check("--namespace", opts.namespace)
    K8S_IMAGE.check("--image", opts.image)
    K8S_PVC.check("--pvc", opts.pvc)
    ABS_PATH.check("--run-mount", opts.run_mount)
    ABS_PATH.check("--run-dir", spec.run_dir)
    check_under("--run-dir", spec.run_dir, "--run-mount", opts.run_mount)
    if PurePosixPath(opts.run_mount).is_relative_to(SHM_MOUNT):
        raise LaunchError(f"--run-mount {opts.run_mount!r}: the pod's shared-memory volume is mounted at {SHM_MOUNT}; "
                          "mount the claim elsewhere (default /runs)")
    if spec.workdir is not None:
        ABS_PATH.check("--workdir", spec.workdir)


def _container(spec: LaunchSpec, opts: K8sOptions) -> dict[str, Any]:
    env = {**spec.environment(), "NNODES": str(spec.nodes), "JOB_NAME": spec.job_name,
           "MASTER_ADDR": f"{spec.job_name}-0.{spec.job_name}"}
    requests: dict[str, Any] = {"cpu": str(spec.cpus_per_rank * spec.nproc_per_node)}
    limits: dict[str, Any] = {}
    if spec.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = spec.gpus_per_node
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": opts.image,
        # The trainer arguments are the script's positional arguments: data, never shell code.
        "command": ["bash", "-c", node_script("preemption.sh", "k8s_node.sh"), "launch-node"],
        "args": list(spec.train_args),
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "volumeMounts": [{"name": "run", "mountPath": opts.run_mount}, {"name": "dshm", "mountPath": SHM_MOUNT}],
    }
    if spec.workdir is not None:
        container["workingDir"] = spec.workdir
    return container


def _exit_code_rule(action: str, codes: list[int]) -> dict[str, Any]:
    return {"action": action, "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": codes}}


def build_manifests(spec: LaunchSpec, opts: K8sOptions) -> list[dict[str, Any]]:
    """The headless Service and the Indexed Job, as the dictionaries the API server receives."""
    _check(spec, opts)
    name = spec.job_name
    metadata = {"name": name, "namespace": opts.namespace}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata,
        # Pod DNS names must resolve before the pods are ready: the rendezvous needs them to start.
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"job-name": name}},
    }
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
        "spec": {
            "completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes,
            # One crash fails every pod (the others' torchrun loses its peers): --backoff-limit counts
            # failures of the whole run, each up to --nodes pod failures.
            "backoffLimit": opts.backoff_limit * spec.nodes,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                _exit_code_rule("Ignore", [REQUEUE_EXIT_CODE]),
                _exit_code_rule("FailJob", [2, 3]),
            ]},
            "template": {
                "metadata": {"labels": {"job-name": name}},
                "spec": {
                    "subdomain": name,
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": spec.grace_s + EXIT_MARGIN_S,
                    "containers": [_container(spec, opts)],
                    "volumes": [
                        {"name": "run", "persistentVolumeClaim": {"claimName": opts.pvc}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{opts.shm_gib}Gi"}},
                    ],
                },
            },
        },
    }
    return [service, job]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the pod's script) as readable `|` blocks; PyYAML falls back to a quoted
    scalar by itself whenever a block could not hold the string exactly. No anchors/aliases for
    the objects the two manifests share: each reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_BlockDumper.add_representer(
    str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def render_k8s(spec: LaunchSpec, opts: K8sOptions) -> str:
    header = ("# Rendered by `python -m launch.render k8s`: render it again rather than edit it.\n"
              "# kubectl apply -f this file; kubectl delete -f it to stop the run (the checkpoints stay).\n")
    return header + yaml.dump_all(build_manifests(spec, opts), Dumper=_BlockDumper, sort_keys=False, width=100)
