"""`niah` suite: needle-in-a-haystack as in the paper. A sentence "The special magic {city} number
is: {number}." (7-digit number) is placed at a depth (0% = right after BOS, 100% = just before the
question) of a haystack cut from the corpus, and the model must complete the question with the
number, greedily. Accuracy per (depth, context length); lengths are fractions of the training
length (the paper: up to 2x). Token-level insertion works for the byte tokenizer and any
tokenizer.json alike."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.tokenizer import Tokenizer
from pretrain.evaluation.documents import document_split, iter_documents
from pretrain.evaluation.scoring import autocast
from pretrain.hf import CliError

CITIES = ("Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Hanoi", "Quito", "Dublin", "Madrid",
          "Seoul", "Lagos", "Prague", "Havana", "Vienna", "Manila", "Bogota", "Lisbon", "Warsaw", "Sydney")
NEEDLE = " The special magic {city} number is: {number}. "
QUESTION = "\nWhat is the special magic {city} number? The special magic {city} number is:"


@dataclass(frozen=True)
class NeedleSample:
    tokens: np.ndarray  # BOS + haystack with the needle + question: exactly the context length
    number: str
    needle_start: int  # token index of the needle


def haystack_tokens(data_dir: Path, needed: int) -> np.ndarray:
    """At least `needed` corpus tokens, documents joined by EOS (cycled when the corpus is short)."""
    from data_pipeline.manifest import read_manifest

    eos = read_manifest(data_dir).eos_id
    parts, have = [], 0
    for doc in iter_documents(data_dir):
        parts += [doc, np.array([eos])]
        have += len(doc) + 1
        if have >= needed:
            return np.concatenate(parts)
    if not have:
        raise CliError(f"{data_dir}: no documents to build a haystack from")
    return np.resize(np.concatenate(parts), needed)


def make_sample(tokenizer: Tokenizer, haystack: np.ndarray, length: int, depth: float,
                rng: random.Random) -> NeedleSample:
    city, number = rng.choice(CITIES), str(rng.randrange(1_000_000, 10_000_000))
    needle = np.asarray(tokenizer.encode(NEEDLE.format(city=city, number=number)), dtype=np.int64)
    question = np.asarray(tokenizer.encode(QUESTION.format(city=city)), dtype=np.int64)
    n_hay = length - 1 - len(needle) - len(question)
    if n_hay < 0:
        raise CliError(f"niah: context length {length} is shorter than the needle and question "
                       f"({len(needle) + len(question) + 1} tokens); use larger --niah-lengths")
    start = rng.randrange(0, len(haystack) - n_hay + 1)
    hay = haystack[start:start + n_hay]
    cut = int(round(depth * n_hay))
    tokens = np.concatenate([[tokenizer.bos_id], hay[:cut], needle, hay[cut:], question]).astype(np.int64)
    return NeedleSample(tokens, number, 1 + cut)


def answer_of(text: str) -> str:
    """The first run of digits the model produced ('' if none)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


def niah_samples(data_dir: Path, tokenizer: Tokenizer, lengths: list[int], depths: list[float], trials: int,
                 seed: int) -> list[list[list[NeedleSample]]]:
    """Every prompt of the suite, [depth][length][trial]: built before any model runs, so a length too
    short for the needle is refused at start (the evaluation's check calls this too)."""
    haystack = haystack_tokens(data_dir, max(lengths))
    rng = random.Random(seed)
    return [[[make_sample(tokenizer, haystack, length, depth, rng) for _ in range(trials)] for length in lengths]
            for depth in depths]


def run_niah(model, data_dir: Path, tokenizer: Tokenizer, lengths: list[int], depths: list[float], trials: int,
             seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    samples = niah_samples(data_dir, tokenizer, lengths, depths, trials, seed)
    max_new = len(tokenizer.encode(" 1234567")) + 2
    accuracy = [[0.0] * len(lengths) for _ in depths]
    examples = []
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            hits = 0
            for sample in samples[i][j]:
                prompt = torch.from_numpy(sample.tokens).unsqueeze(0).to(device)
                with autocast(device, dtype):
                    out = model.generate(prompt, max_new_tokens=max_new)
                said = tokenizer.decode(out[0, len(sample.tokens):].tolist())
                hits += answer_of(said) == sample.number
                if len(examples) < 3:
                    examples.append({"length": length, "depth": depth, "number": sample.number, "output": said})
            accuracy[i][j] = hits / trials
    return {"data": str(data_dir), "split": document_split(data_dir), "lengths": lengths, "depths": depths,
            "trials": trials, "seed": seed,
            "accuracy": accuracy, "mean_accuracy": float(np.mean(accuracy)), "examples": examples}
