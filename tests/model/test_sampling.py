"""The two-stage greedy choice against torch's argmax."""

import pytest
import torch

from pretrain.model.sampling import GREEDY_GROUP, greedy_tokens, sample


@pytest.mark.parametrize("vocab", [1, 7, GREEDY_GROUP, GREEDY_GROUP + 1, 3 * GREEDY_GROUP - 5, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_equal_argmax(vocab, dtype):
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    logits[1] = -torch.inf  # a row with nothing allowed: index 0, as argmax says
    if vocab > 2:
        logits[2, [vocab // 3, vocab - 1]] = 1e4  # a tie (across groups where vocab > 1024): the lower index
        logits[3, :] = 0.0  # every entry tied
        logits[4, [vocab // 2, vocab - 2]] = torch.nan  # NaNs win, the first of them, as in argmax
        logits[0, vocab - 1] = torch.inf
    got = greedy_tokens(logits)
    assert got.shape == (5, 1) and got.dtype == torch.long
    assert torch.equal(got, logits.argmax(-1, keepdim=True))


def test_greedy_tokens_keep_leading_dims():
    logits = torch.randn(2, 3, 2500, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1, keepdim=True))
    assert greedy_tokens(logits[:0]).shape == (0, 3, 1)


def test_sample_at_temperature_zero_is_greedy():
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, 0.0, None, None), logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("kwargs, says", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, "max_new_tokens"), ({"top_k": 0}, "top_k"), ({"top_k": -1}, "top_k"),
    ({"top_k": 513}, r"top_k must be None or an int in \[1, 512\]"), ({"temperature": float("nan")}, "temperature"),
])
def test_generate_refuses_bad_arguments_by_name(kwargs, says):
    from pretrain.model import build_model

    model = build_model("llama", "tiny", vocab_size=512)
    args = {"max_new_tokens": 3, "temperature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=f"generate: {says}"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), **args)
    model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=1, top_k=512, temperature=1.0)  # the bounds
