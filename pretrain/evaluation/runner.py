"""Runs the chosen suites over every checkpoint and writes `results.json` and the PNGs beside it."""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline.files import write_atomic
from pretrain.accounting import flops_per_token
from pretrain.evaluation import plots
from pretrain.evaluation.subject import Subject

SUITES = ("nll", "positions", "niah", "inference", "fewshot")
DEFAULT_SUITES = ("nll", "positions", "niah", "inference")
RESULTS_FILE = "results.json"


@dataclass
class Options:
    """Every knob of every suite (the command line's options, with their defaults)."""

    data: str | None = None  # prepared dir; default: each run's first data source
    seq_len: int | None = None  # the training length (and nll window); default: the run's data.seq_len
    batch_size: int = 8
    nll_batches: int | None = None  # None: the whole split
    positions_multiple: float = 3.0  # of the training length (the paper: 24K after 8K)
    positions_docs: int = 8
    niah_lengths: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # multiples of the training length
    niah_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    niah_trials: int = 2
    inference_batch: int = 4
    inference_prompt: int | None = None  # default: training length / 16 (512 at 8K)
    inference_totals: tuple[int, ...] | None = None  # default: training length x 1/4 .. 4 (2K-32K at 8K)
    fewshot_tasks: tuple[str, ...] = ()
    fewshot_limit: int | None = None
    fewshot_include: str | None = None  # a directory of local lm-eval task YAMLs
    seed: int = 0


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


DATA_SUITES = ("nll", "positions", "niah", "fewshot")


def niah_lengths(train_len: int, opts: Options) -> list[int]:
    return [int(round(m * train_len)) for m in opts.niah_lengths]


def positions_length(train_len: int, opts: Options) -> int:
    """Tokens per window of the positions suite (BOS comes on top)."""
    length = int(round(train_len * opts.positions_multiple))
    if length < 2:
        raise ValueError(f"--positions-multiple {opts.positions_multiple}: a window of {length} tokens at training "
                         f"length {train_len}; raise it (1 is the training length)")
    return length


def inference_lengths(train_len: int, opts: Options) -> tuple[int, list[int]]:
    """(prompt tokens, total lengths) of the inference suite; every total must exceed the prompt."""
    prompt = opts.inference_prompt or max(1, train_len // 16)
    totals = list(opts.inference_totals or (int(train_len * m) for m in (0.25, 0.5, 1, 2, 4)))
    if min(totals) <= prompt:
        raise ValueError(f"--inference-totals {','.join(map(str, totals))}: every total length must exceed the "
                         f"prompt ({prompt} tokens, --inference-prompt); raise the totals or lower the prompt")
    return prompt, totals


def check_subject(subject: Subject, suites: list[str], opts: Options, device: torch.device,
                  dtype: torch.dtype) -> None:
    """What would stop a suite of this checkpoint midway, found before any suite runs: the training
    length, data prepared with the model's tokenizer and enough of it for nll's first batch and
    the positions windows, niah prompts that fit, inference lengths and a cache that fits."""
    from data_pipeline.tokenizer import load_tokenizer

    train_len = subject.train_seq_len
    if any(s in DATA_SUITES for s in suites):
        data_dir = subject.checked_data_dir(opts.data)
        if "nll" in suites:
            from pretrain.evaluation.nll import check_nll_data

            check_nll_data(data_dir, train_len, opts.batch_size, subject.document_masking)
        if "positions" in suites:
            from pretrain.evaluation.documents import long_windows

            long_windows(data_dir, positions_length(train_len, opts), opts.positions_docs)
        if "niah" in suites:
            from pretrain.evaluation.niah import niah_samples

            niah_samples(data_dir, load_tokenizer(data_dir), niah_lengths(train_len, opts), list(opts.niah_depths),
                         opts.niah_trials, opts.seed)
    if "inference" in suites:
        check_cache_fits(subject.model.config, opts.inference_batch, max(inference_lengths(train_len, opts)[1]),
                         device, dtype)


def check_cache_fits(cfg, batch: int, total: int, device: torch.device, dtype: torch.dtype) -> None:
    """The inference suite's caches (the decoder's: SSM states in fp32) fit in the device's memory."""
    from pretrain.accounting import cache_bytes

    need = batch * cache_bytes(cfg, total, dtype.itemsize, ssm_state_bytes=4)
    have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if need > have:
        raise ValueError(f"--inference-totals: caches of {need / 2**30:,.1f} GiB for {batch} sequences of {total:,} "
                         f"tokens exceed this {device.type} device's {have / 2**30:,.1f} GiB; lower "
                         "--inference-totals or --inference-batch")


def run_suites(subject: Subject, suite: str, opts: Options, device: torch.device, dtype: torch.dtype) -> Any:
    from data_pipeline.tokenizer import load_tokenizer

    model, train_len = subject.model, subject.train_seq_len
    if suite == "inference":
        from pretrain.evaluation.inference import run_inference

        prompt, totals = inference_lengths(train_len, opts)
        return run_inference(model, opts.inference_batch, prompt, totals, opts.seed, device, dtype)
    data_dir = subject.data_dir(opts.data)
    if suite == "nll":
        from pretrain.evaluation.nll import run_nll

        return run_nll(model, data_dir, load_tokenizer(data_dir), train_len, opts.batch_size,
                       opts.nll_batches, device, dtype, subject.document_masking)
    if suite == "positions":
        from pretrain.evaluation.positions import run_positions

        return run_positions(model, data_dir, train_len, positions_length(train_len, opts), opts.positions_docs,
                             device, dtype)
    if suite == "niah":
        from pretrain.evaluation.niah import run_niah

        return run_niah(model, data_dir, load_tokenizer(data_dir), niah_lengths(train_len, opts),
                        list(opts.niah_depths), opts.niah_trials, opts.seed, device, dtype)
    from pretrain.evaluation.fewshot import run_fewshot

    return run_fewshot(subject, data_dir, list(opts.fewshot_tasks), opts.fewshot_limit, opts.fewshot_include,
                       device, dtype)


def draw(entries: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """Every figure the results support: name -> file name (relative to `out`)."""
    files: dict[str, Path] = {}

    def by_label(suite: str) -> dict[str, Any]:
        return {e["label"]: e[suite] for e in entries if suite in e}

    if nll := by_label("nll"):
        files["nll"] = plots.plot_bars({k: v["nll"] for k, v in nll.items()}, "validation NLL (nats/token)",
                                       out / "nll.png")
    if pos := by_label("positions"):
        files["positions"] = plots.plot_positions(pos, out / "positions.png")
    for label, r in by_label("niah").items():
        files[f"niah/{label}"] = plots.plot_niah(label, r, out / f"niah_{slug(label)}.png")
    if inf := by_label("inference"):
        files["inference"] = plots.plot_inference(inf, out / "inference.png")
    return {name: path.name for name, path in files.items()}


def recorded_figures(record: Path) -> set[str]:
    """The figures an earlier run into `record`'s directory drew (the ones its record lists)."""
    try:
        return set(json.loads(record.read_text()).get("plots", {}).values())
    except (OSError, ValueError, AttributeError):
        return set()


def remove_stale_figures(out: Path, before: set[str], plots: dict[str, str]) -> None:
    """Figures of an earlier run into `out` (`before`) that this one did not draw: they would no
    longer match the record, results.json or compare.json."""
    for name in before - set(plots.values()):
        if Path(name).name == name and name.endswith(".png"):  # only our own figures, never a path elsewhere
            (out / name).unlink(missing_ok=True)


def evaluate(subjects: list[Subject], suites: list[str], opts: Options, out: Path, device: torch.device,
             dtype: torch.dtype, log=print) -> dict[str, Any]:
    """Every suite of every checkpoint; results.json is rewritten after each suite (`complete`
    false until the last), so an evaluation stopped midway keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    before = recorded_figures(out / RESULTS_FILE)
    results: dict[str, Any] = {"suites": suites, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                               "options": asdict(opts), "complete": False, "checkpoints": [], "plots": {}}
    for subject in subjects:
        fpt = flops_per_token(subject.model.config, subject.flops_seq_len)
        entry: dict[str, Any] = {"label": subject.label, **subject.info, "train_seq_len": subject.train_seq_len,
                                 "flops_per_token": fpt["total"],
                                 "train_flops": fpt["total"] * subject.info["tokens_seen"]
                                 if subject.info["tokens_seen"] else None}
        results["checkpoints"].append(entry)
        with subject.on(device):
            for suite in suites:
                log(f"{subject.label}: {suite} ...")
                entry[suite] = run_suites(subject, suite, opts, device, dtype)
                write_atomic(out / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
    results["plots"] = draw(results["checkpoints"], out)
    results["complete"] = True
    remove_stale_figures(out, before, results["plots"])
    write_atomic(out / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
    return results
