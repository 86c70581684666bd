"""Every `pretrain.evaluate`, `pretrain.scaling` and harness command that docs/evaluation.md and
docs/scaling.md show parses with the command's own parser and passes its option checks (what the
options then do is what the other tests in this directory run)."""
from __future__ import annotations

import re
import shlex
import sys

import pytest
from eval_helpers import REPO

DOCS = [REPO / "docs" / "evaluation.md", REPO / "docs" / "scaling.md"]
TOOLS = ("pretrain.evaluate", "pretrain.scaling", "pretrain.evaluation.harness")


def commands() -> list[tuple[str, list[str]]]:
    """(document, words after `python -m TOOL`) of every documented command of these tools."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if len(words) > 2 and words[1] == "-m" and words[2] in TOOLS:
                    found.append((doc.name, words[2:]))
    return found


def test_the_docs_show_every_tool():
    assert {words[0] for _, words in commands()} == set(TOOLS)


@pytest.mark.parametrize("doc, words", commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_documented_command_parses(doc, words, monkeypatch):
    tool, argv = words[0], words[1:]
    if tool == "pretrain.evaluate" and argv[:1] == ["compare"]:
        from pretrain.evaluate import compare_parser

        compare_parser().parse_args(argv[1:])
    elif tool == "pretrain.evaluate":
        from pretrain.evaluate import build_parser, check_options

        check_options(build_parser().parse_args(argv))
    elif tool == "pretrain.scaling":
        from pretrain.scaling.__main__ import build_parser

        cut = argv.index("--") if "--" in argv else len(argv)
        build_parser().parse_args(argv[:cut])
    else:
        pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")
        from lm_eval._cli import HarnessCLI

        monkeypatch.setattr(sys, "argv", ["lm-eval", *argv])  # the harness parses sys.argv only
        args = HarnessCLI().parse_args()
        assert args.model in ("ours", "hybrid") and "checkpoint" in args.model_args
