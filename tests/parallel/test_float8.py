"""FP8 switch (train.fp8): which linears torchao's float8 takes, and the one-line errors where it
cannot run. Numerics against bf16 need an sm >= 8.9 GPU: tests/gpu/test_fp8_compile.py."""

import pytest
import torch

from parallel.float8 import float8_unavailable
from pretrain.model import build_model
from pretrain.model.parallelize import parallelize_hybrid

pytest.importorskip("torchao.float8", reason="torchao is in the [dev] extra")


def converted(arch: str) -> set[str]:
    from torchao.float8.float8_linear import Float8Linear

    model = build_model(arch, "1b", device="meta")
    parallelize_hybrid(model, None, fp8="rowwise")
    return {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}


def test_filter_takes_large_linears_only_and_leaves_head_router_and_fused_projections():
    names = converted("hybrid_moe")
    model = build_model("hybrid_moe", "1b", device="meta")
    kinds = {n.split(".", 2)[2] for n in names}  # blocks.<i>.<rest>
    # intra-hybrid attention q/v and branch outputs, Mamba2 out_proj, shared-expert SwiGLU; the
    # intra-hybrid's k_proj (2048 -> 288) is too small
    assert kinds == {"mixer.attn.q_proj", "mixer.attn.v_proj", "mixer.out_attn", "mixer.out_ssm", "mixer.out_proj",
                     "ffn.shared.0.w1", "ffn.shared.0.w2", "ffn.shared.0.w3"}, kinds
    assert not any(n.endswith(("router", "z_proj", "x_proj", "B_proj", "C_proj", "dt_proj")) or n == "head"
                   for n in names), names
    for name, m in model.named_modules():  # every unconverted Linear is excluded for a reason
        if isinstance(m, torch.nn.Linear) and name not in names:
            small = min(m.weight.shape) < 512 or any(d % 16 for d in m.weight.shape)
            assert small or name.endswith(("router", "_proj")) or name == "head", name
    llama = converted("llama")  # q, k, v (2048 -> 512), o, w1, w2, w3 in every block
    assert len(llama) == 7 * len(build_model("llama", "1b", device="meta").blocks)


def test_tiny_model_has_nothing_to_convert_and_still_runs():
    model = build_model("llama", "tiny")
    parallelize_hybrid(model, None, fp8="tensorwise")  # every tiny GEMM is < 512: all stay as they were
    assert all(type(m).__name__ != "Float8Linear" for m in model.modules())
    tokens = torch.randint(0, 512, (1, 17))
    model.loss(tokens[:, :-1], tokens[:, 1:]).backward()


def test_unavailable_reasons_name_the_field_and_fix():
    assert float8_unavailable("none", torch.device("cpu")) is None
    msg = float8_unavailable("tensorwise", torch.device("cpu"))
    assert "train.fp8" in msg and "8.9" in msg and "train.fp8=none" in msg and "\n" not in msg
    assert "must be one of" in float8_unavailable("e4m3", torch.device("cpu"))


def test_trainer_refuses_fp8_on_cpu_at_start(tmp_path, corpus):
    from pretrain.config import ConfigError
    from pretrain.trainer import Trainer
    from tests.trainer.trainer_helpers import tiny_config

    with pytest.raises(ConfigError, match="train.fp8"):
        Trainer(tiny_config(tmp_path, corpus, 2, "--train.fp8=rowwise"))
    with pytest.raises(ConfigError, match="train.fp8"):
        Trainer(tiny_config(tmp_path, corpus, 2, "--train.fp8=fp4"))
