"""Checkpoints saved before the Mamba2 and MoE splits (packed Mamba2 `in_proj` / conv, MoE expert
weights `w1/w2/w3` on the MoE) load and resume: one conversion table (pretrain.model.legacy) serves
plain state dicts and DCP checkpoints, model weights and the optimizer's moments alike.

- A fixture written by the old code itself (tests/fixtures/legacy, make_fixture.py) gives the old
  model's logits through the DCP path (`pretrain.hf.load_model`) and the plain state-dict path.
- A trainer checkpoint rewritten in the old layout (the table's inverse, weights and AdamW state)
  resumes on 1 process with the uninterrupted run's losses bit for bit, and at fsdp=2 and
  tp=2 x fsdp=2 (gloo) to rel 1e-5: the second step after the resume needs the converted moments.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import curves
from trainer_helpers import losses, run_to_end, seal, tiny_args

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"
STEPS = 4


def _old_model_dir(tmp_path: Path, **saved_as) -> Path:
    """The fixture's old-layout weights as a sealed checkpoint with the new code's model config
    (its fields `saved_as` replaced in the file)."""
    from pretrain.checkpoint import MODEL_CONFIG_FILE
    from pretrain.model import model_config

    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make_fixture.py")
    made = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(made)  # the model the old code built (its __main__ part does not run)
    path = tmp_path / "step_00000000"
    shutil.copytree(FIXTURE / "model", path)
    saved = model_config(made.ARCH, made.SIZE, **made.OVERRIDES).to_dict()
    (path / MODEL_CONFIG_FILE).write_text(json.dumps({**saved, **saved_as}))
    seal(path)
    return path


def _read_plain(path: Path) -> dict:
    """A DCP checkpoint's whole nested state, as saved (old names stay old)."""
    dcp_to_torch_save(path, path.parent / f"{path.name}.pt")
    return torch.load(path.parent / f"{path.name}.pt", weights_only=False)


def test_old_code_checkpoint_gives_its_logits(tmp_path):
    from pretrain.hf import load_model

    path = _old_model_dir(tmp_path)
    tokens, logits = (torch.load(FIXTURE / f, weights_only=True) for f in ("tokens.pt", "logits.pt"))
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert "model.blocks.0.mixer.in_proj.weight" in saved and "model.blocks.1.mixer.ssm.conv_weight" in saved
    assert "model.blocks.0.ffn.w1" in saved and "model.blocks.0.ffn.experts.w1" not in saved
    model = load_model(path)  # the DCP path
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits, rtol=1e-5, atol=1e-6)
        old = _read_plain(path)["model"]  # the plain path: the modules' load hooks
        for p in model.parameters():
            p.zero_()
        model.load_state_dict(old)
        torch.testing.assert_close(model(tokens), logits, rtol=1e-5, atol=1e-6)


def test_untyped_bool_of_an_old_model_config_reads_as_its_model_was_built(tmp_path, caplog):
    """model.overrides were untyped before: `tie_embeddings = "no"` saved the string, and the model
    (`if cfg.tie_embeddings`) was built tied. Such a checkpoint loads as the model it is, with a
    warning, instead of being refused as not a bool (and cannot be read as untied: no head weights)."""
    from pretrain.hf import load_model

    path = _old_model_dir(tmp_path, tie_embeddings="no")
    tokens, logits = (torch.load(FIXTURE / f, weights_only=True) for f in ("tokens.pt", "logits.pt"))
    with caplog.at_level(logging.WARNING):
        model = load_model(path)
    assert model.config.tie_embeddings is True
    assert "tie_embeddings is 'no', not a bool" in caplog.text and "read as True" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits, rtol=1e-5, atol=1e-6)


def _write_old_layout(src: Path, dst: Path) -> None:
    """Rewrite trainer checkpoint `src` as the code before the splits saved it: model weights,
    AdamW moments (stacked like the weights; one step count) and the param groups' names."""
    from pretrain.hf import read_model_config
    from pretrain.model.legacy import legacy_splits, to_legacy

    splits = legacy_splits(read_model_config(src))
    state = _read_plain(src)
    to_legacy(state["model"], splits)
    moments = state["optim"]["state"]
    for s in splits:
        parts = [moments.pop(name) for name, _ in s.new]
        moments[s.old] = {k: torch.cat([p[k] for p in parts]) if parts[0][k].dim() else parts[0][k] for k in parts[0]}
    firsts = {s.new[0][0]: s.old for s in splits}
    dropped = {name for s in splits for name, _ in s.new[1:]}
    for group in state["optim"]["param_groups"]:
        group["params"] = [firsts.get(n, n) for n in group["params"] if n not in dropped]
    dcp.save(state, checkpoint_id=str(dst))
    for f in src.iterdir():
        if not f.name.endswith(".distcp") and f.name not in (".metadata", "COMPLETE.json"):
            shutil.copy(f, dst / f.name)
    seal(dst)


def _args(run_dir: Path, corpus: Path, dp: int, *extra: str) -> list[str]:
    # the tiny intra-hybrid with 4 SSM and 2 K/V heads, so tp=2 can split them
    return tiny_args(run_dir, corpus, STEPS, f"--train.micro_batch_size={4 // dp}",
                     "--model.overrides.intra.kv_heads=2", "--model.overrides.intra.attn_heads=4",
                     "--model.overrides.intra.ssm_heads=4", *extra)


@pytest.mark.slow
def test_old_layout_trainer_checkpoint_resumes(corpus, tmp_path):
    reference = tmp_path / "reference"
    run_to_end(_args(reference, corpus, 1))
    old = tmp_path / "old" / "step_00000002"
    old.parent.mkdir()
    _write_old_layout(reference / "checkpoints" / "step_00000002", old)
    saved = dcp.FileSystemReader(str(old)).read_metadata().state_dict_metadata
    assert "optim.state.blocks.0.mixer.in_proj.weight.exp_avg" in saved
    assert "model.blocks.0.ffn.w2" in saved and not any("z_proj" in k or "experts" in k for k in saved)

    one = tmp_path / "one"
    run_to_end(_args(one, corpus, 1, f"--resume-from={old}"))
    assert {s: v[-1] for s, v in losses(one).items()} == {s: losses(reference)[s][0] for s in (3, 4)}
    fsdp = tmp_path / "fsdp"
    assert "dp=2" in run_to_end(_args(fsdp, corpus, 2, f"--resume-from={old}"), nproc=2)
    curves.assert_close_curves(fsdp, reference, range(3, STEPS + 1))
    tp_fsdp = tmp_path / "tp_fsdp"  # 2-D (TP x FSDP) shards of the split parts
    assert "dp=2 tp=2" in run_to_end(_args(tp_fsdp, corpus, 2, "--parallel.tp=2", f"--resume-from={old}"), nproc=4)
    curves.assert_close_curves(tp_fsdp, reference, range(3, STEPS + 1))
