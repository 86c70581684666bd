"""What Slurm and Kubernetes accept for each value the launchers write.

Every value that reaches a `#SBATCH` line or a Kubernetes field is checked here first, so that a
value can only ever be data: a newline in a job name can no longer start a new `#SBATCH` line or
a shell command. A refused value gets one line naming the option, what is accepted and the fix.
(Values that reach a shell are also quoted, and manifests are written by a YAML library.)
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import PurePosixPath


class LaunchError(ValueError):
    """A value the scheduler would not accept (or that could change the rendered structure)."""


@dataclass(frozen=True)
class Rule:
    """A pattern a whole value must match, the longest it may be, and the words of the error."""

    pattern: re.Pattern[str]
    accepts: str
    max_len: int = 4096

    def check(self, option: str, value: str, max_len: int | None = None) -> str:
        limit = self.max_len if max_len is None else max_len
        if len(value) > limit or not self.pattern.fullmatch(value):
            raise LaunchError(f"{option} {value!r}: {self.accepts} (at most {limit} characters); give one that is")
        return value


def _rule(pattern: str, accepts: str, max_len: int = 4096) -> Rule:
    return Rule(re.compile(pattern), accepts, max_len)


# Slurm: names are free text to Slurm, but the batch script carries them on `#SBATCH` lines.
SLURM_JOB_NAME = _rule(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", "a Slurm job name is letters, digits and _ . + -", 128)
SLURM_PARTITION = _rule(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*",
                        "Slurm partitions are names of letters, digits and _ . -, separated by commas", 256)
# sbatch --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or no limit.
SLURM_TIME = _rule(r"[0-9]+(:[0-9]{1,2}){0,2}|[0-9]+-[0-9]{1,2}(:[0-9]{1,2}){0,2}|UNLIMITED|INFINITE",
                   "a Slurm time limit is MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, "
                   "DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS", 32)
# Kubernetes object names (apimachinery validation): namespaces are DNS-1123 labels, a Service
# (whose name the pods' hostnames use) a DNS-1035 label, a PersistentVolumeClaim a DNS-1123 subdomain.
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
K8S_NAMESPACE = _rule(_DNS1123_LABEL, "a Kubernetes namespace is lower-case letters, digits and '-', "
                      "starting and ending with a letter or digit", 63)
K8S_JOB_NAME = _rule(r"[a-z]([-a-z0-9]*[a-z0-9])?", "a Kubernetes job name (also its Service's and pods' host "
                     "names) is lower-case letters, digits and '-', starting with a letter, not ending with '-'", 63)
K8S_PVC = _rule(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*", "a PersistentVolumeClaim name is lower-case letters, "
                "digits, '-' and '.', each dot-separated part starting and ending with a letter or digit", 253)
# Image references (the grammar of github.com/distribution/reference): [host[:port]/]path[:tag][@digest].
_PATH_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"({_DOMAIN_PART}(\.{_DOMAIN_PART})*|\[[0-9A-Fa-f:]+\])(:[0-9]+)?"
K8S_IMAGE = _rule(rf"({_DOMAIN}/)?{_PATH_COMPONENT}(/{_PATH_COMPONENT})*(:[\w][\w.-]{{0,127}})?"
                  r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?",
                  "an image reference is [REGISTRY[:PORT]/]NAME[:TAG][@DIGEST] with a lower-case NAME", 512)
# Paths are quoted wherever they reach a shell; control characters are still refused (a newline
# in a path is never intended), and so are the characters #SBATCH --output treats specially.
ABS_PATH = _rule(r"/[^\x00-\x1f\x7f]*", "an absolute path without control characters")
SLURM_RUN_DIR = _rule(r"/[^\x00-\x1f\x7f\"\\%]*",
                      "an absolute path without control characters, '\"', '\\' or '%' (it is written into "
                      "#SBATCH --output)")
NO_CONTROL = _rule(r"[^\x00-\x1f\x7f]+", "a non-empty value without control characters (newlines, tabs)")


def check_under(option: str, path: str, mount_option: str, mount: str) -> None:
    """Kubernetes only sees the run directory through the volume mounted at `mount` (compared as
    written: a '..' could lead out of the volume, so it is refused)."""
    for opt, value in ((option, path), (mount_option, mount)):
        if ".." in PurePosixPath(value).parts:
            raise LaunchError(f"{opt} {value!r}: a path with '..' could leave the shared volume; write it without")
    if not PurePosixPath(path).is_relative_to(mount):
        raise LaunchError(f"{option} {path!r} must lie under {mount_option} {mount!r} (the shared volume); "
                          "fix one of them")


def slurm_time_seconds(limit: str) -> float:
    """Seconds in a Slurm time limit already accepted by SLURM_TIME (inf for no limit)."""
    if limit in ("UNLIMITED", "INFINITE") or not any(c not in "0:-" for c in limit):  # 0: no limit to Slurm
        return float("inf")
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, s = (parts + [0, 0])[:3]
    else:  # M, M:S, H:M:S
        h, m, s = [0, *parts, 0][:3] if len(parts) < 3 else parts
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def int_in_range(low: int, high: int = 2**31 - 1):
    """argparse type: an integer in [low, high], refused with one line otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer in [{low}, {high}]")
        return value
    return parse
