"""The paper's attention:Mamba ratio sweep (T3, T17) at every size: each ratio gets the depth that
keeps the model at its size, the published layouts come out exact, and `ratio`/`placement` are all
the trainer has to pass. Configs and meta-device counts only: nothing here allocates weights."""

import pytest

from pretrain.accounting import block_params, count_params
from pretrain.model import build_model, model_config
from pretrain.model.pattern import PAPER_RATIOS, ratio_counts

SIZES = ("100m", "350m", "1b", "3b")
SPECIAL = {"inter_hybrid": "A", "intra_hybrid": "H"}


def positions(pattern, sym):
    return [i for i, s in enumerate(pattern, 1) if s == sym]


def llama_non_embedding(size):
    return count_params(model_config("llama", size))["non_embedding"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ratio", PAPER_RATIOS)
@pytest.mark.parametrize("arch", sorted(SPECIAL))
def test_every_ratio_keeps_the_preset_size(arch, ratio, size):
    """Within 5% of the size's Llama stack, and no stack one block deeper or shallower is nearer.
    Why 5%: depth moves in whole blocks (a block is 6-17% of these models), so the nearest depth
    can miss by up to half a block; the paper's own presets sit up to 5.7% apart (350M: Llama
    0.35B, Mamba 0.37B) and the worst of this sweep is that same Mamba stack, +4.5%."""
    cfg = model_config(arch, size, ratio=ratio)
    reference, got = llama_non_embedding(size), count_params(cfg)["non_embedding"]
    if (arch, size, ratio) == ("intra_hybrid", "3b", "1:5"):  # the paper's own 4 + 18 wins, +4.6%
        assert cfg.pattern.count("H") == 4 and cfg.n_layers == 22 and abs(got / reference - 1) < 0.05
        return
    assert abs(got - reference) / reference < 0.05, (cfg.pattern, got, reference)

    special = SPECIAL[arch]
    n, k = cfg.n_layers, cfg.pattern.count(special)
    assert k in ratio_counts(ratio, n)
    counts = block_params(cfg)
    for deeper_or_shallower in (n - 1, n + 1):
        for k_other in ratio_counts(ratio, deeper_or_shallower):
            other = counts.non_embedding(special * k_other + "M" * (deeper_or_shallower - k_other))
            assert abs(other - reference) >= abs(got - reference), (cfg.pattern, deeper_or_shallower, k_other)


@pytest.mark.parametrize("ratio,n_blocks,attention", [
    ("1:5", 13, [4, 8]), ("1:3", 13, [3, 7, 11]), ("1:1", 14, [2, 4, 6, 8, 10, 12, 14]), ("1:12", 13, [7]),
])
def test_published_1b_inter_layouts(ratio, n_blocks, attention):
    pattern = model_config("inter_hybrid", "1b", ratio=ratio).pattern
    assert len(pattern) == n_blocks and positions(pattern, "A") == attention


def test_published_placements_and_defaults():
    inter = {p: positions(model_config("inter_hybrid", "1b", ratio="1:5", placement=p).pattern, "A")
             for p in ("front", "middle", "end")}
    assert inter == {"front": [1, 8], "middle": [4, 8], "end": [4, 11]}  # T17
    intra = {p: positions(model_config("intra_hybrid", "1b", placement=p).pattern, "H")
             for p in ("scatter", "cluster", "sandwich")}
    assert intra == {"scatter": [5, 9], "cluster": [9, 10], "sandwich": [1, 13]}  # T21
    assert model_config("inter_hybrid", "1b").pattern == "MMMAMMMAMMMMM"
    assert model_config("hybrid_moe", "1b").pattern == "MMMMHMMMHMMMM"


def test_3b_hybrids_are_the_papers_4_plus_18():
    for arch, special in (("inter_hybrid", "A"), ("intra_hybrid", "H"), ("hybrid_moe", "H")):
        pattern = model_config(arch, "3b").pattern
        assert (pattern.count(special), pattern.count("M")) == (4, 18), arch


@pytest.mark.parametrize("size", SIZES)
def test_pure_ends_of_the_sweep_are_the_baselines(size):
    llama, mamba = model_config("llama", size), model_config("mamba2", size)
    assert model_config("inter_hybrid", size, ratio="1:0").pattern == llama.pattern
    for arch in SPECIAL:
        assert model_config(arch, size, ratio="0:1").pattern == mamba.pattern
    assert model_config("llama", size, ratio="1:0").pattern == llama.pattern
    assert model_config("mamba2", size, ratio="0:1").pattern == mamba.pattern
    assert llama.n_layers == {"100m": 8, "350m": 14, "1b": 16, "3b": 28}[size]  # PAPER T8
    assert mamba.n_layers == {"100m": 6, "350m": 11, "1b": 13, "3b": 21}[size]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ratio", ["1:1", "1:3", "1:5", "1:12"])
def test_no_adjacent_attention_under_middle_placement(size, ratio):
    assert "AA" not in model_config("inter_hybrid", size, ratio=ratio, placement="middle").pattern
    assert "HH" not in model_config("intra_hybrid", size, ratio=ratio, placement="scatter").pattern


@pytest.mark.parametrize("ratio", PAPER_RATIOS)
def test_moe_variants_keep_the_dense_layout(ratio):
    for size in SIZES:
        assert model_config("inter_hybrid_moe", size, ratio=ratio).pattern == \
            model_config("inter_hybrid", size, ratio=ratio).pattern
        intra = model_config("intra_hybrid", size, ratio=ratio).pattern
        assert model_config("intra_hybrid_moe", size, ratio=ratio).pattern == intra
        assert model_config("hybrid_moe", size, ratio=ratio).pattern == intra


def test_swa_and_tiny_presets_unchanged():
    """Pinned: the SWA baseline (3 global of 16 at 1B) and the tiny presets other tests train."""
    swa = {s: model_config("swa", s).pattern for s in ("tiny", *SIZES)}
    assert swa == {"tiny": "SSAS", "100m": "SSASSASS", "350m": "SSSASSSASSASSS", "1b": "SSSASSSSASSSASSS",
                   "3b": "SSSSASSSSASSSSASSSASSSSASSSS"}
    assert model_config("hybrid_moe", "tiny").pattern == "MMMHMM"
    assert model_config("inter_hybrid", "tiny").pattern == "MMMAMM"
    assert model_config("inter_hybrid", "tiny", ratio="1:1").pattern == "MAMAMA"  # tiny: fixed depth
    assert model_config("swa", "1b", ratio="1:3").pattern.count("A") == 4  # a ratio keeps 16 blocks


def test_depth_is_counted_from_the_overridden_sizes():
    """Wider Mamba blocks (d_ssm 8192) need fewer of them to reach the same size; the reference is
    the Llama stack of the same sizes, so 1:0 stays at its 16 blocks whatever the override."""
    assert model_config("inter_hybrid", "1b", ratio="0:1", d_ssm=8192).n_layers == 10
    assert model_config("inter_hybrid", "1b", ratio="1:0", d_ffn=4096).n_layers == 16


@pytest.mark.parametrize("arch,kwargs,message", [
    ("inter_hybrid", dict(ratio="1-5"), r"ratio '1-5' is invalid: use 'A:M'.*\(the paper's: 1:0, 1:1"),
    ("inter_hybrid", dict(ratio="0:0"), r"ratio '0:0' is invalid"),
    ("inter_hybrid", dict(placement="scatter"), r"placement 'scatter' does not fit --arch inter_hybrid: "
                                                r"use one of middle, front, end$"),
    ("hybrid_moe", dict(placement="middle"), r"placement 'middle' does not fit --arch hybrid_moe: "
                                             r"use one of scatter, cluster, sandwich$"),
    ("llama", dict(ratio="1:3"), r"ratio '1:3' does not fit --arch llama: it takes 'N:0'"),
    ("mamba2_moe", dict(ratio="1:5"), r"ratio '1:5' does not fit --arch mamba2_moe: it takes '0:N'"),
    ("llama", dict(placement="front"), r"placement 'front': --arch llama is a pure stack with nothing to place"),
    ("mamba2_moe", dict(placement="middle"), r"--arch mamba2_moe is a pure stack"),
    ("inter_hybrid", dict(ratio="1:3", pattern="MAMA"), r"pattern 'MAMA' is explicit; drop ratio/placement"),
])
def test_bad_ratio_or_placement_is_one_line(arch, kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        model_config(arch, "1b", **kwargs)
    assert "\n" not in str(e.value)


def test_trainer_keywords_build_the_layout_and_record_it():
    """`model.ratio` / `model.placement` reach `build_model` as these two keywords; None (or '',
    a config's unset string) is the preset's own; the pattern is what a checkpoint saves."""
    model = build_model("inter_hybrid", "1b", ratio="1:1", placement="front", device="meta")
    assert model.config.pattern == "AM" * 7
    assert model.config.to_dict()["pattern"] == "AM" * 7 and len(model.blocks) == 14
    default = model_config("inter_hybrid", "1b")
    for unset in (None, ""):
        assert model_config("inter_hybrid", "1b", ratio=unset, placement=unset) == default
