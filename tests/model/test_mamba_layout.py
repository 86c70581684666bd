"""Mamba2's split projections: weights saved in the packed layout (in_proj rows [z, x, B, C, dt],
conv channels [x, B, C]) load into the split modules and give the same logits."""
import pytest
import torch

from pretrain.model import build_model
from pretrain.model.legacy import convert, legacy_splits


def packed_state(model) -> dict[str, torch.Tensor]:
    """`model`'s state dict in the layout checkpoints had before the splits, written from that
    layout's description (not from legacy.py's table, which it checks): each Mamba2 mixer's
    `in_proj.weight` with rows [z, x, B, C, dt] (x absent under value sharing) and its
    `conv_weight` / `conv_bias` with channels [x, B, C]; the MoE's expert stacks `w1`, `w2`, `w3`
    on the FFN itself."""
    state = dict(model.state_dict())
    for key in [k for k in state if k.endswith(".z_proj.weight")]:
        prefix = key.removesuffix("z_proj.weight")
        rows = [f"{prefix}{part}_proj.weight" for part in ("z", "x", "B", "C", "dt")]
        state[f"{prefix}in_proj.weight"] = torch.cat([state.pop(name) for name in rows if name in state])
        for kind in ("weight", "bias"):
            state[f"{prefix}conv_{kind}"] = torch.cat([state.pop(f"{prefix}conv_{part}.{kind}") for part in "xBC"])
    for key in [k for k in state if ".ffn.experts.w" in k]:
        state[key.replace(".experts.", ".")] = state.pop(key)
    return state


@pytest.mark.parametrize("arch,overrides", [("mamba2", {}), ("mamba2", {"n_groups": 2}),
                                            ("intra_hybrid", {"intra": {"value_sharing": True}})])
def test_packed_checkpoint_loads_into_split_layout(arch, overrides):
    torch.manual_seed(0)
    saved = build_model(arch, "tiny", **overrides)
    old = packed_state(saved)
    assert any(k.endswith("in_proj.weight") for k in old)
    torch.manual_seed(1)
    fresh = build_model(arch, "tiny", **overrides)
    fresh.load_state_dict(old)
    tokens = torch.randint(0, 512, (2, 24))
    assert torch.equal(fresh(tokens), saved(tokens))


@pytest.mark.parametrize("arch", ["hybrid_moe", "inter_hybrid"])
def test_old_state_converts_from_the_config_alone(arch):
    """What a checkpoint loader needs: the split state (Mamba2 and MoE) from the old one without
    module instances."""
    model = build_model(arch, "tiny", intra={"value_sharing": True})
    state = packed_state(model)
    assert any(k.endswith("conv_weight") for k in state)
    assert (model.config.moe is None) != any(k.endswith("ffn.w1") for k in state)
    convert(state, legacy_splits(model.config))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_conv_inputs_are_a_view_of_the_projection():
    """x, B and C reach the conv as a column slice of the one projection GEMM's output, not a copy
    (one [b, l, conv_dim] tensor per layer less: 1.46 GiB over the 1B hybrid_moe's 11 Mamba2 layers), with the
    values of the per-part projections; the one-token paths (packed weights or not) agree."""
    import torch.nn.functional as F

    from pretrain.model.mamba2 import Mamba2

    torch.manual_seed(0)
    mixer = Mamba2(64, 4, 16, 8)
    mixer.reset_parameters()
    u = torch.randn(2, 5, 64)
    z, xbc, dt = mixer._project(u, None)
    assert xbc.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    parts = [F.linear(u, p.weight) for p in mixer.projections()]
    for got, want in zip((z, xbc, dt), (parts[0], torch.cat(parts[1:-1], -1), parts[-1])):
        torch.testing.assert_close(got, want)
    packed = torch.cat([p.weight for p in mixer.projections()])
    for one_token in (mixer._project(u[:, :1], None), mixer._project(u[:, :1], None, packed)):
        for got, want in zip(one_token, (z, xbc, dt)):
            torch.testing.assert_close(got, want[:, :1])
