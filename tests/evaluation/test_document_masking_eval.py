"""The nll suite scores packed validation windows document by document when the run trained with
data.document_masking (read from its config.toml), and across documents otherwise."""
import torch

from data_pipeline.tokenizer import load_tokenizer
from pretrain.evaluation.nll import run_nll
from pretrain.evaluation.subject import Subject
from pretrain.model import build_model


def test_nll_suite_follows_the_runs_document_masking(corpus):
    torch.manual_seed(0)
    model = build_model("swa", "tiny", vocab_size=load_tokenizer(corpus).vocab_size).double().eval()
    masked = Subject(corpus, model, {"data": {"document_masking": True}})
    assert masked.document_masking and not Subject(corpus, model, {"data": {}}).document_masking
    args = (model, corpus, load_tokenizer(corpus), 64, 4, 4, torch.device("cpu"), torch.float32)
    on, off = run_nll(*args, document_masking=True), run_nll(*args)
    assert on["document_masking"] and not off["document_masking"] and on["tokens"] == off["tokens"]
    assert abs(on["nll"] - off["nll"]) > 1e-6  # the windows hold document boundaries (an untrained model: small)
