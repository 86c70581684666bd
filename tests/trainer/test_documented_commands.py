"""Every trainer command that README.md and docs/*.md show starts as written: each one is dry-run
at the world size it would run at (torchrun's nodes x processes, a WORLD_SIZE= prefix, or the
launcher's nodes x GPUs), with its data directory pointed at the test corpus. The model-report
commands run as written."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from parallel.pipeline import too_old_for
from pretrain import describe
from pretrain.main import main
from trainer_helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_lines(doc: Path) -> list[str]:
    """The commands of a document's ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(" ".join(shlex.quote(w) for w in words))
    return lines


def option(words: list[str], name: str, default: str | None) -> str | None:
    return words[words.index(name) + 1] if name in words else default


def trainer_launch(command: str) -> tuple[list[str], int] | None:
    """(trainer arguments, world size) of a command that starts the trainer, else None."""
    words = shlex.split(command)
    for pipe in ("&&", "|", ">"):
        if pipe in words:
            words = words[:words.index(pipe)]
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    if "pretrain/main.py" in words:
        args = words[words.index("pretrain/main.py") + 1:]
        if words[0] == "torchrun":
            world = int(option(words, "--nnodes", "1")) * int(option(words, "--nproc-per-node", "1"))
        else:
            world = int(env.get("WORLD_SIZE", "1"))
        return args, world
    if "launch.render" in words and "--" in words:
        per_node = option(words, "--procs-per-node", option(words, "--gpus-per-node", "8"))
        return words[words.index("--") + 1:], int(option(words, "--nodes", "1")) * int(per_node)
    return None


def documented(kind: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for line in shell_lines(doc):
            if (kind == "trainer" and trainer_launch(line)) or (kind == "describe" and "pretrain.describe" in line):
                found.append((doc.name, line))
    return found


def as_dry_run(args: list[str], corpus: Path, tmp_path: Path) -> list[str]:
    """The same arguments with the data directory and run directory made local, plus --dry-run."""
    out, i = [], 0
    while i < len(args):
        if args[i] in ("--data", "--run-dir", "--resume-from") and i + 1 < len(args):
            out += [args[i], str(corpus if args[i] == "--data" else tmp_path / "run")]
            i += 2
            continue
        out.append(args[i])
        i += 1
    return [*out, "--dry-run"]


def test_the_docs_show_trainer_commands():
    docs = {doc for doc, _ in documented("trainer")}
    assert {"README.md", "training.md"} <= docs and len(documented("trainer")) >= 6


@pytest.mark.parametrize("doc, command", documented("trainer"))
def test_documented_trainer_command_starts(doc, command, corpus, tmp_path, monkeypatch, capsys):
    args, world = trainer_launch(command)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(as_dry_run(args, corpus, tmp_path))
    schedule = option([a for w in args for a in w.split("=", 1)], "--parallel.pp_schedule", None)
    if schedule is not None and too_old_for(schedule):  # the docs say which torch it needs
        assert code == 2 and f"pp_schedule={schedule!r} needs torch >=" in capsys.readouterr().err
        return
    assert code == 0, f"{doc}: `{command}` at world size {world}: {capsys.readouterr().err}"
    assert f"at world size {world}," in capsys.readouterr().out


@pytest.mark.parametrize("doc, command", documented("describe"))
def test_documented_model_report_runs(doc, command, capsys):
    words = shlex.split(command)
    describe.main(words[words.index("pretrain.describe") + 1:])
    assert "pattern" in capsys.readouterr().out


def test_readme_enters_the_environment_before_its_first_python_command():
    """In a fresh clone `python` has no torch: the README must say how to enter .venv first."""
    lines = (REPO / "README.md").read_text().splitlines()
    first_python = next(i for i, line in enumerate(lines) if line.startswith("python "))
    assert any("source .venv/bin/activate" in line for line in lines[:first_python])
