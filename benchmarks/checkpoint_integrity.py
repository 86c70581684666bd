"""What checkpoint integrity costs: save a real model + AdamW checkpoint the way the trainer does
(DCP through CheckpointManager, which hashes every file before it commits), then time hashing and
verifying it on their own, from page cache and, where the OS lets us drop it, from disk.

    PYTHONPATH=. python benchmarks/checkpoint_integrity.py --arch llama --size 1b --out DIR

Prints a table and writes DIR/checkpoint_integrity.json. One process: with N ranks each hashes
about 1/N of the files, so the hashing share of a save shrinks with the number of ranks.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from pretrain.checkpoint import CheckpointManager, verify_checkpoint
from pretrain.checkpoint_integrity import file_digest, read_marker
from pretrain.model import build_model


def drop_page_cache() -> bool:
    """Needs root and a writable /proc/sys (not in every container): False when refused."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--size", default="1b")
    ap.add_argument("--out", type=Path, default=Path("runs/checkpoint_integrity"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(args.arch, args.size, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step fills both AdamW moments, as in a real checkpoint
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)

    ckpt_dir = args.out / "checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    manager = CheckpointManager(ckpt_dir, keep=1, async_save=False, is_main=True)
    start = time.perf_counter()
    path = manager.save(1, {"model": model_sd, "optim": optim_sd}, {"rank": 0}, {"step": 1}, {"config.toml": ""})
    save_s = time.perf_counter() - start
    files = read_marker(path)
    total_bytes = sum(r.size for r in files.values())

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    hash_warm_s = timed(lambda: [file_digest(path / n) for n in files])
    verify_warm_s = timed(lambda: verify_checkpoint(path))
    cold = drop_page_cache()
    verify_cold_s = timed(lambda: verify_checkpoint(path)) if cold else None
    result = {
        "arch": args.arch, "size": args.size, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()), "files": len(files),
        "checkpoint_gib": total_bytes / 2**30, "save_with_hashing_s": save_s, "hash_warm_s": hash_warm_s,
        "hash_gib_per_s_warm": total_bytes / 2**30 / hash_warm_s, "hash_share_of_save": hash_warm_s / save_s,
        "verify_warm_s": verify_warm_s, "verify_cold_s": verify_cold_s,
        "verify_gib_per_s_cold": total_bytes / 2**30 / verify_cold_s if verify_cold_s else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checkpoint_integrity.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"{'checkpoint':<28}{args.arch} {args.size}: {result['parameters'] / 1e9:.2f}B params, "
          f"{result['checkpoint_gib']:.1f} GiB in {len(files)} files")
    print(f"{'save (DCP write + hashing)':<28}{save_s:.1f} s")
    print(f"{'hashing (page cache)':<28}{hash_warm_s:.1f} s = {result['hash_gib_per_s_warm']:.1f} GiB/s, "
          f"{100 * result['hash_share_of_save']:.0f}% of the save (one process)")
    print(f"{'verify (page cache)':<28}{verify_warm_s:.1f} s")
    print(f"{'verify (from disk)':<28}" + (f"{verify_cold_s:.1f} s = {result['verify_gib_per_s_cold']:.1f} GiB/s"
                                          if verify_cold_s else "not measured (page cache could not be dropped)"))


if __name__ == "__main__":
    main()
