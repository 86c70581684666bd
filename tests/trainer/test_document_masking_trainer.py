"""data.document_masking through the trainer: the loader emits document starts and the trainer's
loss is the model's document-masked loss (which differs from the unmasked one on a window with a
boundary); a masked run trains; resuming with the setting changed fails in one line unless allowed."""
import pytest
import torch

from data_pipeline.loader import build_train_loader
from pretrain.config import ConfigError
from pretrain.model.packed import PackedDocs, without_unneeded_starts
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


def test_single_document_batches_run_unmasked(corpus, tmp_path, monkeypatch):
    """The fast path: a batch whose rows each lie in one document (a start only at a row's first
    token, or only at the target-only last column) drops its starts on the CPU and a masked
    trainer's step runs unmasked (no PackedDocs built), bitwise masking off's step; the masked
    computation of that batch agrees to rounding (the fast path is exact). A batch with a
    boundary inside keeps the mask."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (4, 33), generator=gen)
    single = torch.zeros(4, 33, dtype=torch.bool)
    single[:2, 0] = True  # rows 0-1 start a document; rows 2-3 continue one
    single[1, 32] = True  # a start seen only as a target
    inside = single.clone()
    inside[3, 17] = True

    assert "doc_starts" not in without_unneeded_starts({"tokens": tokens, "doc_starts": single})
    assert without_unneeded_starts({"tokens": tokens, "doc_starts": inside})["doc_starts"] is inside

    masked = Trainer(tiny_config(tmp_path / "on", corpus, 1, "--data.document_masking=true"))
    off = Trainer(tiny_config(tmp_path / "off", corpus, 1))
    with torch.no_grad():
        mask_math = masked.model.loss(tokens[:, :-1], tokens[:, 1:], PackedDocs.from_starts(single[:, :-1]))
        unmasked = masked.model.loss(tokens[:, :-1], tokens[:, 1:])
        boundary = masked.model.loss(tokens[:, :-1], tokens[:, 1:], PackedDocs.from_starts(inside[:, :-1]))
    torch.testing.assert_close(mask_math, unmasked, rtol=1e-6, atol=1e-6)
    assert abs(boundary.item() - unmasked.item()) > 1e-4  # a boundary does change the loss

    def no_mask(starts):
        raise AssertionError("a batch of single-document rows built a document mask")

    monkeypatch.setattr(PackedDocs, "from_starts", staticmethod(no_mask))
    masked._train_iter = iter([{"tokens": tokens, "doc_starts": single}])
    off._train_iter = iter([{"tokens": tokens}])
    assert masked.train_step()["train/loss"] == off.train_step()["train/loss"]
    for (name, p), q in zip(masked.model.named_parameters(), off.model.parameters()):
        assert torch.equal(p, q), name
