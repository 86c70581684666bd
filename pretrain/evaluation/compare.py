"""`python -m pretrain.evaluate compare OUT_A OUT_B ...`: the architectures side by side, the way the
paper's T2 sets them: one row per checkpoint (parameters, training FLOPs, NLL, bits per byte,
long-context and decode figures, few-shot average), the same figures drawn together."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from data_pipeline.files import write_atomic
from pretrain.evaluation.runner import RESULTS_FILE, draw, recorded_figures, remove_stale_figures
from pretrain.evaluation.subject import unique_labels
from pretrain.hf import CliError

COMPARE_FILE = "compare.json"
COLUMNS = ("label", "pattern", "params (non-emb)", "train FLOPs", "val NLL", "bits/byte", "NLL <= train len",
           "NLL > train len", "NIAH acc", "cache MiB", "decode tok/s", "median-step tok/s", "few-shot avg")


def read_results(path: Path) -> dict[str, Any]:
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise CliError(f"{path}: no {RESULTS_FILE}; pass directories written by `python -m pretrain.evaluate --out`")
    try:
        results = json.loads(file.read_text())
    except ValueError as e:
        raise CliError(f"{file}: not JSON ({e}); run the evaluation again") from None
    entries = results.get("checkpoints") if isinstance(results, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("checkpoint"), str)
                                                for e in entries):
        raise CliError(f"{file}: not the {RESULTS_FILE} of an evaluation (no list of checkpoints, each with its "
                       "path); pass directories written by `python -m pretrain.evaluate --out`")
    if results.get("complete") is False:
        print(f"note: {file}: an evaluation that stopped midway; the suites it did not run show as -", file=sys.stderr)
    return results


def merge(paths: list[Path]) -> list[dict[str, Any]]:
    """One entry per checkpoint (its absolute path) over every results file, suites run separately
    joined (a suite present in several inputs: the later input's), labelled over them all as
    `evaluate` labels the checkpoints of one run."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for entry in read_results(path)["checkpoints"]:
            merged.setdefault(str(Path(entry["checkpoint"]).resolve()), {}).update(entry)
    entries = list(merged.values())
    labels = unique_labels([e.get("arch") for e in entries], [Path(e["checkpoint"]) for e in entries])
    for e, label in zip(entries, labels):
        e["label"] = label
    return entries


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row(e: dict[str, Any]) -> list[str]:
    nll, pos, niah, inf, few = (e.get(k) or {} for k in ("nll", "positions", "niah", "inference", "fewshot"))
    last = inf["points"][-1] if inf.get("points") else {}
    cache = last.get("cache_bytes") / 2**20 / inf["batch"] if last else None
    return [e["label"], e.get("pattern", "-"), _fmt(e.get("non_embedding_params"), ",d"),
            _fmt(e.get("train_flops"), ".2e"), _fmt(nll.get("nll"), ".4f"), _fmt(nll.get("bits_per_byte"), ".4f"),
            _fmt(pos.get("nll_within_train_length"), ".4f"), _fmt(pos.get("nll_beyond_train_length"), ".4f"),
            _fmt(niah.get("mean_accuracy"), ".2f"), _fmt(cache, ".3g"), _fmt(last.get("tokens_per_s"), ".1f"),
            _fmt(last.get("median_step_tokens_per_s"), ".1f"), _fmt(few.get("average"), ".4f")]


def markdown_table(entries: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(e)) + " |" for e in entries]
    return "\n".join(lines) + "\n"


def compare(paths: list[Path], out: Path) -> str:
    """Writes compare.json, compare.md and the joint figures into `out`; returns the table."""
    entries = merge(paths)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(entries)
    notes = ("cache MiB: per sequence at the longest decoded length, as measured (dtype of the run); "
             "decode tok/s: batch tokens/s up to that length; median-step tok/s: from the median decode step there.\n")
    before = recorded_figures(out / COMPARE_FILE)
    plots = draw(entries, out)
    remove_stale_figures(out, before, plots)
    write_atomic(out / "compare.md", table + "\n" + notes)
    write_atomic(out / COMPARE_FILE, json.dumps({"inputs": [str(p) for p in paths], "columns": COLUMNS,
                                                "rows": [row(e) for e in entries], "checkpoints": entries,
                                                "plots": plots}, indent=1) + "\n")
    return table
