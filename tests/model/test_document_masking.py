"""Document masking (`PackedDocs`): a row packing several documents gives, for every architecture,
the logits and parameter gradients of running each document alone (float64, 1e-10); the ops'
document paths (FlexAttention mask_mod, conv and SSD resets) against their references; packed
generation and NLL scoring; masking off leaves the model's computation as it was."""
import pytest
import torch

from pretrain.evaluation.scoring import token_nll
from pretrain.model import ARCHS, build_model
from pretrain.model.ops import attention_reference, causal_conv1d_reference, ssd_scan_reference
from pretrain.model.ops.attention import flex_document_attention
from pretrain.model.ops.conv import _conv_taps
from pretrain.model.packed import PackedDocs, masking_needed

# tiny: d_conv 4, SWA window 16 + 4 sinks, Mamba chunk 16. Per row: documents shorter than the conv
# width, one longer than the window (and than a chunk), boundaries inside and on chunk edges.
LAYOUTS = [[2, 27, 1, 14, 20], [16, 3, 22, 11, 12]]


def packed_rows(vocab: int, layouts: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens and doc_starts [len(layouts), L] (every layout sums to L)."""
    gen = torch.Generator().manual_seed(seed)
    length = sum(layouts[0])
    tokens = torch.randint(0, vocab, (len(layouts), length), generator=gen)
    starts = torch.zeros(len(layouts), length, dtype=torch.bool)
    for row, lengths in enumerate(layouts):
        assert sum(lengths) == length
        starts[row, torch.tensor([0] + lengths[:-1]).cumsum(0)] = True
    return tokens, starts


def doc_slices(lengths: list[int]) -> list[slice]:
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return [slice(e - n, e) for n, e in zip(lengths, ends)]


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_documents_alone(arch):
    torch.manual_seed(0)
    model = build_model(arch, "tiny").double()
    tokens, starts = packed_rows(model.config.vocab_size, LAYOUTS)
    weights = torch.randn(*tokens.shape, model.config.vocab_size, dtype=torch.float64)  # a loss touching every logit

    logits = model(tokens, positions=PackedDocs.from_starts(starts))
    (logits * weights).sum().backward()
    packed_grads = grads(model)

    alone = torch.empty_like(logits)
    for row, lengths in enumerate(LAYOUTS):
        for sl in doc_slices(lengths):
            out = model(tokens[row:row + 1, sl])
            (out * weights[row:row + 1, sl]).sum().backward()
            alone[row, sl] = out[0].detach()
    alone_grads = grads(model)

    assert (logits.detach() - alone).abs().max().item() < 1e-10
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, g in packed_grads.items():
        assert (g - alone_grads[name]).abs().max().item() < 1e-10 * max(1.0, alone_grads[name].abs().max().item()), name
    # the test can fail: without masking the packed logits differ from the documents' own
    assert (model(tokens) - alone).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "swa", "mamba2", "hybrid_moe"])
def test_masking_off_and_one_document(arch):
    """Masking off is the model's own computation (the default positions); a row holding one
    document gives the unmasked result through the document kernels."""
    torch.manual_seed(0)
    model = build_model(arch, "tiny").double()
    tokens = torch.randint(0, model.config.vocab_size, (2, 45))
    plain = model(tokens)
    assert torch.equal(plain, model(tokens, positions=torch.arange(45)))
    one_doc = PackedDocs.from_starts(torch.zeros(2, 45, dtype=torch.bool))
    assert (model(tokens, positions=one_doc) - plain).abs().max().item() < 1e-12


def test_from_starts():
    docs = PackedDocs.from_starts(torch.tensor([[False, False, True, False, True, True], [True] + [False] * 5]))
    assert docs.positions.tolist() == [[0, 1, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5]]
    assert docs.doc.tolist() == [[0, 0, 1, 1, 2, 3], [0] * 6]
    step = docs.next_token()
    assert step.positions.tolist() == [[1], [6]] and step.doc.tolist() == [[3], [0]]


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_flex_mask_matches_reference():
    """The FlexAttention mask_mods (the CUDA path) against the reference, eager on CPU: global and
    sliding window + sinks, self-attention (keys as separate tensors and as the queries' own) and a
    context-parallel query chunk over longer keys."""
    torch.manual_seed(0)
    tokens, starts = packed_rows(8, LAYOUTS)
    docs = PackedDocs.from_starts(starts)
    b, length = tokens.shape
    q = torch.randn(b, 4, length, 16, dtype=torch.float64)
    k, v = torch.randn(2, b, 2, length, 16, dtype=torch.float64)
    pos, doc = docs.positions, docs.doc
    for window, n_sink in ((None, 0), (16, 4), (5, 2)):
        for lo, hi in ((0, length), (24, 56)):  # queries [lo, hi) over the keys [0, hi)
            args = (q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], pos[:, lo:hi], pos[:, :hi], doc[:, lo:hi], doc[:, :hi])
            ref = attention_reference(*args[:5], window, n_sink, *args[5:])
            out = flex_document_attention(*args, window, n_sink, compiled=False)
            assert (out - ref).abs().max().item() < 1e-12, (window, n_sink, lo)
        # keys that are the queries' own tokens (the same tensors): the index-order mask_mod
        self_out = flex_document_attention(q, k, v, pos, pos, doc, doc, window, n_sink, compiled=False)
        assert (self_out - attention_reference(q, k, v, pos, pos, window, n_sink, doc, doc)).abs().max().item() < 1e-12


def test_conv_and_scan_reset_at_document_starts():
    """Conv and SSD reference with seq_idx equal the ops run per document (with and without a
    carried-in state, which belongs to the first document)."""
    torch.manual_seed(0)
    lengths = [2, 27, 1, 14, 20]
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    length, d, h, p, n = sum(lengths), 6, 4, 8, 5
    x = torch.randn(1, d, length, dtype=torch.float64)
    w, bias, conv_state = torch.randn(d, 4, dtype=torch.float64), torch.randn(d, dtype=torch.float64), \
        torch.randn(1, d, 3, dtype=torch.float64)
    xs = torch.randn(1, length, h, p, dtype=torch.float64)
    dt = torch.rand(1, length, h, dtype=torch.float64)
    A = -torch.rand(h, dtype=torch.float64)
    B, C = torch.randn(2, 1, length, 2, n, dtype=torch.float64)
    ssm_state = torch.randn(1, h, p, n, dtype=torch.float64)
    for states in ((None, None), (conv_state, ssm_state)):
        y = causal_conv1d_reference(x, w, bias, states[0], seq_idx)
        ys, final = ssd_scan_reference(xs, dt, A, B, C, 16, states[1], seq_idx)
        for i, sl in enumerate(doc_slices(lengths)):
            first = states if i == 0 else (None, None)
            torch.testing.assert_close(y[..., sl], causal_conv1d_reference(x[..., sl], w, bias, first[0]),
                                       rtol=0, atol=1e-12)
            ys_doc, final_doc = ssd_scan_reference(xs[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], 16, first[1])
            torch.testing.assert_close(ys[:, sl], ys_doc, rtol=0, atol=1e-12)
        torch.testing.assert_close(final, final_doc, rtol=0, atol=1e-12)
    cache = {}  # a batch's kernel cache: the layers after the first reuse the documents' conv taps
    for layer in range(2):
        x_layer = x * (layer + 1)
        assert torch.equal(causal_conv1d_reference(x_layer, w, bias, None, seq_idx, cache),
                           causal_conv1d_reference(x_layer, w, bias, None, seq_idx))
    assert len(cache) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training's mixed precision: fp32 weights, bf16 conv
        y_bf16 = causal_conv1d_reference(x.float(), w.float(), bias.float(), None, seq_idx)
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.double(), causal_conv1d_reference(x, w, bias, None, seq_idx),
                               rtol=0.05, atol=0.05)


@pytest.mark.parametrize("case", ["full", "no_bias", "weights_only", "no_start_reaches_back", "strided_grad"])
def test_masked_conv_gradients_equal_the_masked_taps(case):
    """The masked conv's hand-written backward (the conv's own gradients corrected at the dropped
    taps) equals autograd through the w masked taps (`_conv_taps`, what compiled blocks
    run), for x, the carried-in state, weight and bias: with and without a bias, with only the
    weights needing gradients, with no document start reaching back, and for a strided upstream
    gradient. Under autocast, bf16 keeps fp32 gradients and an fp64 conv stays fp64."""
    torch.manual_seed(0)
    lengths = [2, 1, 9, 3, 1, 1, 13]  # documents shorter than the conv, adjacent one-token documents
    if case == "no_start_reaches_back":
        lengths = [30]
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    seq_idx = torch.stack([seq_idx, seq_idx.roll(5) if len(lengths) > 1 else seq_idx])  # a row starts mid-document
    d, length = 5, sum(lengths)
    leaves = {"x": torch.randn(2, d, length, dtype=torch.float64), "w": torch.randn(d, 4, dtype=torch.float64),
              "bias": None if case == "no_bias" else torch.randn(d, dtype=torch.float64),
              "state": torch.randn(2, d, 3, dtype=torch.float64)}
    needs = {"w", "bias"} if case == "weights_only" else set(leaves)
    grad_out = torch.linspace(-1, 1, 2 * d * length, dtype=torch.float64)
    if case == "strided_grad":
        grad_out = grad_out.reshape(2, length, d).transpose(1, 2)
    else:
        grad_out = grad_out.reshape(2, d, length)

    def grads(masked_taps: bool, dtype=torch.float64):
        t = {k: v.detach().to(dtype).requires_grad_(k in needs) if v is not None else None for k, v in leaves.items()}
        if masked_taps:
            y = _conv_taps(t["x"], t["state"], t["w"], t["bias"], seq_idx)
        else:
            y = causal_conv1d_reference(t["x"], t["w"], t["bias"], t["state"], seq_idx)
        y.backward(grad_out.to(y.dtype))
        return y, {k: v.grad for k, v in t.items() if v is not None and k in needs}

    y, g = grads(False)
    y_ref, g_ref = grads(True)
    assert (y - y_ref).abs().max().item() < 1e-12
    assert g.keys() == g_ref.keys() == {k for k in needs if leaves[k] is not None}
    for k in g:
        assert (g[k] - g_ref[k]).abs().max().item() < 1e-12, k
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16, g_bf16 = grads(False, torch.float32)
        y_fp64, _ = grads(False)
    assert y_bf16.dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in g_bf16.values())
    assert y_fp64.dtype == torch.float64  # autocast leaves fp64 alone, as the unmasked conv
    for k in g_bf16:
        torch.testing.assert_close(g_bf16[k].double(), g_ref[k], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("arch", ["swa", "mamba2", "intra_hybrid"])
def test_generate_and_score_packed_rows(arch):
    """Generation continues each row's last document as if prompted with it alone; token NLL of
    packed rows is each document's own."""
    torch.manual_seed(0)
    model = build_model(arch, "tiny").double().eval()
    tokens, starts = packed_rows(model.config.vocab_size, LAYOUTS)
    out, logits = model.generate(tokens, 6, return_logits=True, doc_starts=starts)
    nll = token_nll(model, tokens[:, :-1], tokens[:, 1:], doc_starts=starts[:, :-1])
    for row, lengths in enumerate(LAYOUTS):
        last = doc_slices(lengths)[-1]
        alone, alone_logits = model.generate(tokens[row:row + 1, last], 6, return_logits=True)
        assert torch.equal(out[row, -6:], alone[0, -6:])
        assert (logits[row] - alone_logits[0]).abs().max().item() < 1e-10
        for sl in (s for s in doc_slices(lengths)[:-1] if s.stop - s.start > 1):  # targets inside the document
            doc_nll = token_nll(model, tokens[row:row + 1, sl][:, :-1], tokens[row:row + 1, sl][:, 1:])
            assert (nll[row, sl.start:sl.stop - 1] - doc_nll[0]).abs().max().item() < 1e-5  # fp32 NLL


def test_masking_needed_only_for_a_start_inside_a_row():
    """The fast path's rule: starts at a row's first token do not need the mask, one inside does;
    a device tensor is refused (deciding on it would sync)."""
    starts = torch.zeros(3, 8, dtype=torch.bool)
    starts[0, 0] = True
    assert not masking_needed(starts)
    starts[2, 7] = True
    assert masking_needed(starts)
    with pytest.raises(ValueError, match="CPU doc_starts"):
        masking_needed(starts.to("meta"))
