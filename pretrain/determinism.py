"""What a bitwise-exact resume depends on: every RNG a step draws from, and the runtime.

RNG states are captured as plain JSON (no pickle: a checkpoint's train state is read without
executing anything) and restored exactly. The runtime fingerprint is saved beside them because
the same states still give different floats under another CPU thread count (reductions split
differently) or another torch/CUDA build: resume warns when it changed.
"""
from __future__ import annotations

import base64
import platform
import random
from typing import Any

import numpy as np
import torch


def _bytes_to_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _text_to_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": _bytes_to_text(torch.get_rng_state()),
             "python": {"version": version, "state": list(internal), "gauss": gauss},
             "numpy": {"key": key, "state": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _bytes_to_text(torch.cuda.get_rng_state())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["key"], np.asarray(n["state"], np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_text_to_bytes(state["cuda"]))


def runtime_fingerprint() -> dict[str, Any]:
    return {"num_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any] | None = None) -> list[str]:
    """'key: saved -> now' for every runtime property that differs from the checkpoint's."""
    now = now or runtime_fingerprint()
    return [f"{k}: {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k]]
