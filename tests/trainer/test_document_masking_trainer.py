"""data.document_masking through the trainer: the loader emits document starts and the trainer's
loss is the model's document-masked loss (which differs from the unmasked one on a window with a
boundary); a masked run trains; resuming with the setting changed fails in one line unless allowed."""
import pytest
import torch

from data_pipeline.loader import build_train_loader
from pretrain.config import ConfigError
from pretrain.model.packed import PackedDocs
from pretrain.trainer import Trainer

from trainer_helpers import losses, tiny_config


def test_masked_training_and_resume_guard(corpus, tmp_path):
    masked = Trainer(tiny_config(tmp_path / "masked", corpus, 2, "--data.document_masking=true"))
    loader = build_train_loader([(str(corpus), 1.0)], 32, 4, num_streams=8, emit_doc_boundaries=True)
    batch = next(b for b in loader if b["doc_starts"][:, 1:-1].any())  # a boundary inside a window
    tokens, starts = batch["tokens"], batch["doc_starts"]
    with torch.no_grad():
        expected = masked.model.loss(tokens[:, :-1], tokens[:, 1:], PackedDocs.from_starts(starts[:, :-1]))
        unmasked = masked.model.loss(tokens[:, :-1], tokens[:, 1:])
        assert masked._loss(tokens, starts).item() == expected.item()
    assert abs(expected.item() - unmasked.item()) > 1e-4
    masked.train()
    assert len(losses(tmp_path / "masked")) == 2

    step2 = tmp_path / "masked" / "checkpoints" / "step_00000002"
    with pytest.raises(ConfigError, match=r"^config: data.document_masking=false but checkpoint .* was trained with "
                                          r"true; drop the change, or set data.allow_document_masking_change=true"):
        Trainer(tiny_config(tmp_path / "off", corpus, 4, f"--checkpoint.resume_from={step2}"))
    forced = Trainer(tiny_config(tmp_path / "off", corpus, 4, f"--checkpoint.resume_from={step2}",
                                 "--data.allow_document_masking_change=true"))
    assert forced.train()["status"] == "finished"
