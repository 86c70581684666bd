"""`python -m pretrain.hf export/import`: a trained checkpoint leaves and re-enters through transformers."""
from __future__ import annotations

import pytest
import torch

from pretrain.hf import load_model, main
from pretrain.trainer import Trainer
from trainer_helpers import tiny_config, weights


@pytest.fixture(scope="module")
def llama_checkpoint(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("llama")
    Trainer(tiny_config(run_dir, corpus, 2, "--arch", "llama")).train()
    return run_dir / "checkpoints" / "step_00000002"


def test_export_loads_offline_in_transformers_with_identical_logits(llama_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(llama_checkpoint), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ours = load_model(llama_checkpoint).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits.float() - ours(tokens)).abs().max().item()
    assert diff < 1e-4


def test_import_round_trip_and_init_from(llama_checkpoint, corpus, tmp_path):
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported"
    main(["export", "--checkpoint", str(llama_checkpoint), "--out", str(hf_dir)])
    assert main(["import", "--hf", str(hf_dir), "--out", str(imported)]) == 0
    a, b = weights(llama_checkpoint), weights(imported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trainer = Trainer(tiny_config(tmp_path / "run", corpus, 1, "--arch", "llama",
                                  f"--checkpoint.init_from={imported}", "--checkpoint.every=0"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume()
    started = trainer.model.state_dict()
    assert all(torch.equal(started[k], a[k]) for k in a) and not all(torch.equal(before[k], a[k]) for k in a)


def test_init_from_a_different_model_names_the_tensors(llama_checkpoint, corpus, tmp_path):
    from pretrain.config import ConfigError

    trainer = Trainer(tiny_config(tmp_path, corpus, 1, "--arch", "mamba2", f"--checkpoint.init_from={llama_checkpoint}"))
    with pytest.raises(ConfigError, match="init_from.*do not fit.*blocks"):
        trainer.resume()
