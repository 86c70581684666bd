"""`inference` suite: decode speed and cache memory against total length, the shape of the paper's
T13 (batch 4, 512-token prompt, totals 2K-32K at 8K training). One prefill and one greedy decode
to the longest total; tokens/s at each total is the batch's new tokens so far over the decode time
so far (what a separate run to that total would measure, without repeating the shorter ones);
`median_step_tokens_per_s` is the batch over the median step time since the previous total, which
other work on a shared CPU does not skew (on a GPU, where steps are queued, read `tokens_per_s`).
The cache is measured from the live `InferenceCache` tensors and set beside the bf16 figure
`pretrain.accounting` predicts. Decoding is `model(next_token, cache)`, the model's own decode
path (fast kernels are used where the model dispatches to them)."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from pretrain.accounting import CACHE_BYTES_PER_ELEMENT, cache_elements
from pretrain.evaluation.scoring import autocast
from pretrain.model.lm import InferenceCache


def cache_bytes(obj: Any) -> int:
    """Bytes of the decoding state (the int64 key positions / document ids kept for masking excluded)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(cache_bytes(v) for k, v in obj.items() if k not in ("pos", "doc"))
    if isinstance(obj, list):
        return sum(cache_bytes(v) for v in obj)
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_inference(model, batch: int, prompt_len: int, totals: list[int], seed: int, device: torch.device,
                  dtype: torch.dtype) -> dict[str, Any]:
    totals = sorted(totals)
    if totals[0] <= prompt_len:
        raise ValueError(f"inference: every total length must exceed the prompt ({prompt_len}); got {totals}")
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    cache = InferenceCache(len(model.blocks))
    points = []
    with autocast(device, dtype):
        _sync(device)
        t0 = time.perf_counter()
        nxt = model(prompt, cache)[:, -1:].argmax(-1)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        t0 = last = time.perf_counter()
        steps: list[float] = []  # since the previous total
        for length in range(prompt_len + 1, totals[-1] + 1):
            nxt = model(nxt, cache)[:, -1:].argmax(-1)
            if length in totals:
                _sync(device)
            now = time.perf_counter()
            steps.append(now - last)
            last = now
            if length in totals:
                elapsed = now - t0
                points.append({"total": length, "decode_s": elapsed,
                               "tokens_per_s": batch * (length - prompt_len) / elapsed,
                               "median_step_tokens_per_s": batch / statistics.median(steps),
                               "cache_bytes": cache_bytes(cache.layers),
                               "cache_elements_predicted": batch * cache_elements(model.config, length),
                               "cache_bytes_bf16_predicted": batch * CACHE_BYTES_PER_ELEMENT
                               * cache_elements(model.config, length)})
                steps = []
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # timings on a shared CPU depend on what else runs: the load beside them says how much
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"batch": batch, "prompt": prompt_len, "prefill_s": prefill_s, "points": points,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "peak_memory_bytes": peak,
            "cpu_load_1min": load, "cpu_threads": torch.get_num_threads()}
