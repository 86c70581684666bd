"""Mamba2's split projections: weights saved in the packed layout (in_proj rows [z, x, B, C, dt],
conv channels [x, B, C]) load into the split modules and give the same logits."""
import pytest
import torch

from pretrain.model import build_model
from pretrain.model.legacy import convert, legacy_splits, to_legacy


def packed_state(model) -> dict[str, torch.Tensor]:
    """`model`'s state dict in the layout checkpoints had before the split."""
    state = dict(model.state_dict())
    to_legacy(state, legacy_splits(model.config))
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
