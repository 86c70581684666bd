"""Pipeline stage splits: the pattern's `|` marks kept in the model config and used as stages,
else stages balanced exactly by FLOPs per block; stage models hold only their blocks under the
whole model's parameter names; a layout the pipeline cannot run fails in one line naming the field."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.model import build_model
from pretrain.model.config import ModelConfig
from pretrain.model.decode import Decoder
from pretrain.model.lm import HybridLM
from pretrain.model.parallelize import pipeline_model
from pretrain.model.pattern import balance_stages, pipeline_stages


def brute_force(costs: list[float], n: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), n - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_balance_is_optimal_and_contiguous():
    rng = random.Random(0)
    for _ in range(30):
        costs = [rng.choice([1.0, 1.3, 4.0, 0.5]) for _ in range(rng.randint(2, 9))]
        n = rng.randint(1, len(costs))
        stages = balance_stages(costs, n)
        assert stages[0][0] == 0 and stages[-1][1] == len(costs) and len(stages) == n
        assert all(a < b for a, b in stages) and all(s[1] == t[0] for s, t in zip(stages, stages[1:]))
        assert max(sum(costs[a:b]) for a, b in stages) == pytest.approx(brute_force(costs, n))
    assert balance_stages([1, 1, 1, 3], 2) == ((0, 3), (3, 4))  # not 2 + 2 blocks


def test_marks_are_kept_and_are_the_stages():
    cfg = build_model("hybrid_moe", "tiny", device="meta", pattern="MA|MM").config
    assert cfg.pattern == "MA|MM" and cfg.blocks == tuple("MAMM")
    assert pipeline_stages(cfg.pattern, 2, [9.0, 1, 1, 1]) == ((0, 2), (2, 4))  # marks win over costs
    with pytest.raises(ValueError, match=r"marks 2 pipeline stages but the layout needs 4 \(parallel.pp"):
        pipeline_stages(cfg.pattern, 4, [1.0] * 4)
    with pytest.raises(ValueError, match="cannot split 4 blocks into 5 pipeline stages"):
        pipeline_stages("MAMM", 5, [1.0] * 4)


def test_stage_models_hold_their_blocks_under_global_names():
    cfg = build_model("hybrid_moe", "tiny", device="meta", pattern="MAMM", tie_embeddings=False).config
    full = {n for n, _ in pipeline_model(cfg, ((0, 4),), [0]).named_parameters()}
    for stages in (((0, 1), (1, 4)), ((0, 2), (2, 3), (3, 4))):
        parts = [pipeline_model(cfg, stages, [i]) for i in range(len(stages))]
        names = [{n for n, _ in p.named_parameters()} for p in parts]
        assert set().union(*names) == full and sum(map(len, names)) == len(full)  # a partition of the names
        assert parts[0].embed is not None and parts[-1].head is not None and parts[-1].norm is not None
        assert all(p.embed is None for p in parts[1:]) and all(p.head is None for p in parts[:-1])
        assert [list(p.blocks) for p in parts] == [[str(i) for i in range(a, b)] for a, b in stages]


def test_tied_embeddings_cannot_be_split():
    cfg = ModelConfig(pattern="MA", vocab_size=64, d_model=16, d_ffn=32, n_heads=2, n_kv_heads=1, head_dim=8,
                      d_ssm=32, ssm_head_dim=16, d_state=8, chunk_size=8)
    with pytest.raises(ValueError, match="tie_embeddings=false"):
        pipeline_model(cfg, ((0, 1), (1, 2)), [0])


@pytest.mark.parametrize("extra, needle", [
    ([], "parallel.pp > 1 needs untied embeddings"),
    (["--parallel.pp_schedule=gpipe"], "parallel.pp_schedule = 'gpipe' is unknown: choose one of 1f1b"),
    (["--model.overrides.tie_embeddings=false", "--parallel.pp_microbatches=3"],
     "parallel.pp_microbatches=3 must divide train.micro_batch_size=4"),
    (["--model.overrides.tie_embeddings=false", "--parallel.pp_microbatches=1"],
     "parallel.pp_microbatches=1 must be >= parallel.pp=2"),
    (["--model.overrides.tie_embeddings=false", "--model.overrides.pattern=M|A|M|M"],
     "marks 4 pipeline stages but the layout needs 2"),
])
def test_bad_pipeline_layouts_fail_in_one_line(extra, needle, tmp_path):
    from pretrain.config import parse_args
    from pretrain.job import build_model_from_config, pipeline_plan

    with pytest.raises(ConfigError) as e:  # at parsing, else when the trainer or the dry run plans the stages
        cfg, _ = parse_args(["--arch", "hybrid_moe", "--size", "tiny", "--run-dir", str(tmp_path),
                             "--data.seq_len=32", "--train.micro_batch_size=4", "--parallel.pp=2", *extra])
        pipeline_plan(cfg, build_model_from_config(cfg, device="meta").config)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_unmarked_stages_balance_flops_with_the_head_on_the_last(tmp_path):
    from pretrain.config import parse_args
    from pretrain.job import build_model_from_config, pipeline_plan

    cfg, _ = parse_args(["--arch", "hybrid_moe", "--size", "3b", "--run-dir", str(tmp_path), "--parallel.pp=4",
                         "--model.overrides.tie_embeddings=false"])
    stages, per_rank = pipeline_plan(cfg, build_model_from_config(cfg, device="meta").config)
    assert per_rank == 1 and len(stages) == 4 and stages[-1][1] == 22
    sizes = [b - a for a, b in stages]
    assert sizes[-1] < max(sizes)  # the last stage carries the head: fewer blocks


def test_a_pipeline_stage_without_its_pipeline_refuses_to_generate_in_one_line():
    cfg = ModelConfig(pattern="MA", vocab_size=64, d_model=16, d_ffn=32, n_heads=2, n_kv_heads=1, head_dim=8,
                      d_ssm=32, ssm_head_dim=16, d_state=8, chunk_size=8, tie_embeddings=False)
    model = HybridLM(cfg)
    prompt = torch.zeros(1, 4, dtype=torch.long)
    assert model.generate(prompt, 2).shape == (1, 6)  # the whole model generates
    for first, last in ((True, False), (False, True)):
        with pytest.raises(ValueError, match=r"on a pipeline stage \(parallel.pp > 1\) needs its rank's pipeline") as e:
            model.stage([0] if first else [1], first, last).generate(prompt, 2)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=r"static decoder needs the whole model, not a pipeline stage") as e:
            Decoder(model.stage([0] if first else [1], first, last), 1, 6)
        assert "\n" not in str(e.value)
