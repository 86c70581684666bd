"""The compiled two-stage greedy choice (what a compiled decode step's head runs) against torch's
argmax on CUDA. CUDA only."""

import pytest
import torch

from pretrain.model.sampling import greedy_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_greedy_tokens_equal_argmax(dtype):
    vocab = 128256  # the 1B presets' vocabulary: 126 groups, the last padded
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(6, vocab, device="cuda", generator=g).to(dtype)
    logits[1] = -torch.inf  # nothing allowed: index 0
    logits[2, [5, 70000, vocab - 1]] = 1e4  # a tie across groups: the lowest index
    logits[3] = 0.0  # every entry tied
    logits[4, [3000, vocab - 3]] = torch.nan  # the first NaN, as argmax
    logits[5, vocab - 1] = torch.inf  # in the padded group
    got = torch.compile(greedy_tokens, dynamic=False)(logits)
    assert torch.equal(got, logits.argmax(-1, keepdim=True))
