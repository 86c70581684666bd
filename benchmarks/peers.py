"""Training-step throughput against the peers a user would run instead, in one process and one run:
our llama vs transformers' LlamaForCausalLM, our mamba2 vs mamba-ssm's MambaLMHeadModel (Mamba2
mixer + gated MLP), at the same dims, timed by the same function (`gpu_model.time_train_step`).

    python benchmarks/peers.py --out runs/peers [--profile]                   # H200: 1B, seq 8192, batch 2
    python benchmarks/peers.py --device cpu --preset tiny --seq 32 --warmup 1 --iters 1 --out /tmp/peers

Ratios are ours / peer from this run only. mamba-ssm is imported through its Triton kernels (a
placeholder stands in for its compiled `selective_scan_cuda`, see shared/GPU.md); where it is not
installed (any CPU box) that row says "unavailable". `--profile` adds where each row's step time
goes (kernels per step, the top kernels, the top ops by input shape, shares by kind). Writes
peers.json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_model, run as a script or imported by path

from compile_fp8 import options  # noqa: E402
from gpu_model import profile_lines, time_train_step, train_step_throughput  # noqa: E402

from pretrain.model import model_config  # noqa: E402

PAIRS = (("llama", "transformers_llama"), ("mamba2", "mamba_ssm_mamba2"))


def hf_llama(preset: str, device: torch.device) -> tuple[torch.nn.Module, Callable, int]:
    from transformers import LlamaForCausalLM

    from pretrain.model.hf import hf_config

    cfg = model_config("llama", preset)
    model = LlamaForCausalLM(hf_config(cfg)).to(device)
    # transformers shifts the labels itself: inputs as labels predict the same next tokens
    return model, lambda inputs, targets: model(input_ids=inputs, labels=inputs).loss, cfg.vocab_size


def mamba_ssm_lm(preset: str, device: torch.device) -> tuple[torch.nn.Module, Callable, int]:
    """MambaLMHeadModel at our mamba2 preset's dims: same depth, d_model, SSM heads and state, and
    a gated MLP of d_ffn per block."""
    from pretrain.model.ops.library import has_mamba_ssd

    if not has_mamba_ssd():
        raise ImportError("mamba-ssm is not installed (pip install mamba-ssm; its Triton kernels need CUDA)")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    try:  # mamba-ssm's fused split-conv-scan path needs causal-conv1d's CUDA build
        import causal_conv1d  # noqa: F401
        mem_eff = True
    except ImportError:
        mem_eff = False
    cfg = model_config("mamba2", preset)
    ssm = {"layer": "Mamba2", "d_state": cfg.d_state, "headdim": cfg.ssm_head_dim, "expand": cfg.d_ssm // cfg.d_model,
           "ngroups": cfg.n_groups, "d_conv": cfg.d_conv, "chunk_size": cfg.chunk_size, "use_mem_eff_path": mem_eff}
    mc = MambaConfig(d_model=cfg.d_model, d_intermediate=cfg.d_ffn, n_layer=cfg.n_layers, vocab_size=cfg.vocab_size,
                     ssm_cfg=ssm, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                     tie_embeddings=cfg.tie_embeddings, pad_vocab_size_multiple=1)
    model = MambaLMHeadModel(mc, device=device)

    def loss(inputs, targets):
        logits = model(inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    return model, loss, cfg.vocab_size


PEERS = {"transformers_llama": hf_llama, "mamba_ssm_mamba2": mamba_ssm_lm}


def run_row(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """A peer (eager, bf16 autocast: how it runs out of the box), or one of ours as `arch variant`
    (variants as in benchmarks/compile_fp8.py: eager, compile+copies - the trainer's one-GPU setup)."""
    torch.manual_seed(0)
    if name in PEERS:
        model, loss, vocab = PEERS[name](args.preset, device)
        params = sum(p.numel() for p in model.parameters())
        return {"model": name, "params": params, **time_train_step(
            model, loss, vocab, args.batch, args.seq, device, args.warmup, args.iters, profile=args.profile)}
    arch, variant = name.split(" ")
    return {"model": name, **train_step_throughput(arch, args.batch, args.seq, args.preset, str(device), args.warmup,
                                                   args.iters, **options(variant), profile=args.profile)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for peers.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--archs", default="llama,mamba2", help="which of our archs (and their peers) to run")
    ap.add_argument("--variants", default="eager,compile+copies",
                    help="our setups, as in benchmarks/compile_fp8.py; each gets a ratio to the peer")
    ap.add_argument("--profile", action="store_true",
                    help="per row, kernels per step, the top kernels and ops (by shape), shares by kind")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "rows": {}, "ratios": {}}
    for arch, peer in ((a, p) for a, p in PAIRS if a in args.archs.split(",")):
        ours = [f"{arch} {v}" for v in args.variants.split(",")]
        for name in (*ours, peer):
            try:
                results["rows"][name] = run_row(name, args, device)
            except Exception as e:  # a missing package or an OOM: said, not hidden
                why = f"unavailable: {type(e).__name__}: {e}".splitlines()[0][:200]
                results["rows"][name] = {"model": name, "error": why}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        b = results["rows"][peer]
        for name in ours:
            a = results["rows"][name]
            if "error" not in a and "error" not in b:
                results["ratios"][f"{name} / {peer}"] = a["tokens_per_s"] / b["tokens_per_s"]
        (out / "peers.json").write_text(json.dumps(results, indent=2))
    for r in results["rows"].values():  # the profiles first: the short table closes the output
        if r.get("profile"):
            print("\n".join(profile_lines(r["model"], r)))
    print(f"{'model':<30}{'params':>14}{'step ms':>10}{'tokens/s':>12}{'peak GiB':>10}")
    for r in results["rows"].values():
        if "error" in r:
            print(f"{r['model']:<30}{r['error']}")
        else:
            peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            print(f"{r['model']:<30}{r['params']:>14,}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}{peak:>10}")
    for k, v in results["ratios"].items():
        print(f"{k}: {v:.2f}x")


if __name__ == "__main__":
    main()
