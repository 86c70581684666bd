"""Every `python -m launch.render` command the docs show renders as written (and its manifests
match the Kubernetes schema), so the documented commands are the tested ones."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from launch.render import main
from launch_helpers import validate_manifest

REPO = Path(__file__).resolve().parents[2]
DOCS = ["docs/launch.md", "docs/training.md", "README.md"]
COMMAND = "python -m launch.render "
SHELL_OPERATORS = {">", "|", "&&", ";"}


def documented_commands(path: Path) -> list[list[str]]:
    """Commands in ```bash blocks that start with COMMAND, continuation lines joined, cut at the
    first shell operator."""
    commands, in_bash, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_bash, pending = line.strip() == "```bash", ""
            continue
        if not in_bash:
            continue
        pending += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        if pending.startswith(COMMAND):
            words = shlex.split(pending, comments=True)[3:]
            cut = next((i for i, w in enumerate(words) if w in SHELL_OPERATORS), len(words))
            commands.append(words[:cut])
        pending = ""
    return commands


CASES = [(doc, argv) for doc in DOCS for argv in documented_commands(REPO / doc)]


def test_the_launcher_guide_shows_both_targets():
    targets = [argv[0] for doc, argv in CASES if doc == "docs/launch.md"]
    assert targets.count("slurm") >= 2 and targets.count("k8s") >= 1, targets


@pytest.mark.parametrize("doc, argv", CASES, ids=[f"{d}:{a[0]}-{i}" for i, (d, a) in enumerate(CASES)])
def test_documented_command_renders(tmp_path, doc, argv):
    if "--out" in argv:  # write where the test can read it, not into the working directory
        argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    out = tmp_path / "rendered"
    assert main([argv[0], "--out", str(out), *argv[1:]]) == 0
    if argv[0] == "k8s":
        for manifest in yaml.safe_load_all(out.read_text()):
            validate_manifest(manifest)
