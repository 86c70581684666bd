"""`inference` suite: decode speed and cache memory against total length, the shape of the paper's
T13 (batch 4, 512-token prompt, totals 2K-32K at 8K training). One prefill and one greedy decode
to the longest total; tokens/s at each total is the batch's new tokens so far over the decode time
so far (what a separate run to that total would measure, without repeating the shorter ones);
`median_step_tokens_per_s` is the batch over the median step time since the previous total, which
other work on a shared CPU does not skew (on a GPU, where steps are queued, read `tokens_per_s`).
The cache is measured from the live cache (its occupied slots) and set beside the bf16 figure
`pretrain.accounting` predicts. Decoding runs on the static decoder (`pretrain.model.decode`):
preallocated caches, one shape-static step replayed as a CUDA graph on GPU; under bf16 the weights
are cast to bf16 for the run (autocast would cast them again at every step) and restored after."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from pretrain.accounting import cache_bytes
from pretrain.model.decode import Decoder
from pretrain.model.ops.precision import wide_dtype
from pretrain.model.sampling import greedy_tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def weights_in(model, dtype: torch.dtype) -> Iterator[None]:
    """The model's floating-point parameters in `dtype` inside the block, the originals after."""
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    originals = [p.data for p in params]
    for p in params:
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in zip(params, originals):
            p.data = data


@torch.no_grad()
def run_inference(model, batch: int, prompt_len: int, totals: list[int], seed: int, device: torch.device,
                  dtype: torch.dtype) -> dict[str, Any]:
    totals = sorted(totals)
    if totals[0] <= prompt_len:
        raise ValueError(f"inference: every total length must exceed the prompt ({prompt_len}); got {totals}")
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    points = []
    if device.type == "cuda":  # this checkpoint's peak, not the process's so far
        torch.cuda.reset_peak_memory_stats(device)
    with weights_in(model, dtype):
        decoder = Decoder(model, batch, totals[-1])
        _sync(device)
        t0 = time.perf_counter()
        nxt = greedy_tokens(decoder.prefill(prompt))
        _sync(device)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if decoder.use_graph:
            decoder.capture_until(totals[-1], greedy=True)
        _sync(device)
        capture_s = time.perf_counter() - t0
        t0 = last = time.perf_counter()
        steps: list[float] = []  # since the previous total
        for length in range(prompt_len + 1, totals[-1] + 1):
            nxt = decoder.greedy_step(nxt)
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
                               "cache_bytes": decoder.cache.used_bytes(),
                               "cache_bytes_predicted": batch * cache_bytes(
                                   model.config, length, dtype.itemsize, wide_dtype(dtype).itemsize)})
                steps = []
        allocated = decoder.cache.allocated_bytes()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # timings on a shared CPU depend on what else runs: the load beside them says how much
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"batch": batch, "prompt": prompt_len, "prefill_s": prefill_s, "points": points,
            "cuda_graph": decoder.use_graph, "graph_error": decoder.graph_error, "graph_capture_s": capture_s,
            "cache_allocated_bytes": allocated,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "peak_memory_bytes": peak,
            "cpu_load_1min": load, "cpu_threads": torch.get_num_threads()}
