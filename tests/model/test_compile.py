"""Per-block torch.compile: every block kind traces as one graph (a graph break inside an
activation-checkpointed block makes dynamo run the whole block eagerly, which is why the trainer's
compile option used to gain ~1%), and a compiled block computes what the eager block does.
The custom ops behind the GPU kernels are checked with torch.library.opcheck where they run."""


import pytest
import torch
import torch._dynamo

from pretrain.model import build_model
from pretrain.model.mamba2 import Mamba2
from pretrain.model.packed import PackedDocs

# (arch, symbol of the block to take): attention, sliding window, Mamba2, intra-hybrid, each with a
# SwiGLU FFN, and a Mamba2 block with the MoE FFN.
BLOCKS = {"attention": ("llama", "A"), "swa": ("swa", "S"), "mamba2": ("mamba2", "M"),
          "intra_hybrid": ("intra_hybrid", "H"), "moe": ("hybrid_moe", "M")}


def tiny_block(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    arch, symbol = BLOCKS[kind]
    model = build_model(arch, "tiny")
    return next(b for b in model.blocks.values() if b.symbol == symbol)


def inputs(d_model: int, documents: bool = False, seq: int = 48):
    """x and the positions: plain, or packed documents (document masking: a start mid-row)."""
    x = torch.randn(2, seq, d_model, generator=torch.Generator().manual_seed(1), requires_grad=True)
    if not documents:
        return x, torch.arange(seq)
    starts = torch.zeros(2, seq, dtype=torch.bool)
    starts[0, 17], starts[1, 30] = True, True
    return x, PackedDocs.from_starts(starts)


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_traces_as_one_graph(kind, documents):
    block = tiny_block(kind)
    x, pos = inputs(block.mixer_norm.weight.shape[0], documents)
    torch._dynamo.reset()
    report = torch._dynamo.explain(block)(x, pos)
    assert report.graph_break_count == 0, [str(r.reason)[:200] for r in report.break_reasons]
    assert report.graph_count == 1


def test_trainer_layout_compiles_inside_checkpointing():
    """parallelize_hybrid with compile and activation checkpointing: every block really compiles
    (a checkpoint wrapper around the compiled block, not the reverse: the MoE's load counting is a
    side effect dynamo refuses inside a checkpointed region, and ran the whole block eagerly), the
    recompute does not count the routing again, and loss and gradients equal the eager model's."""
    from torch._dynamo.utils import counters

    from pretrain.model import parallelize

    torch.manual_seed(0)
    model, eager = build_model("hybrid_moe", "tiny", pattern="MA"), build_model("hybrid_moe", "tiny", pattern="MA")
    eager.load_state_dict(model.state_dict())
    parallelize.parallelize_hybrid(model, None, activation_checkpointing=True, compile=True, compile_backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    tokens = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    losses = []
    for m in (model, eager):
        loss = m.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.detach())
    # 2 block kinds, one graph each: the recompute in backward runs the forward's graph (the MoE's
    # load counting decides at run time that a recompute must not count twice)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], (counters["stats"], counters["graph_break"])
    loads = [[m.tokens_per_expert.clone() for m in lm.moe_layers()] for lm in (model, eager)]
    assert all(torch.equal(a, b) for a, b in zip(*loads)) and loads[1][0].sum() > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()) if q.grad is not None]
    assert len(grads) > 20
    for a, b in grads:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,documents", [(k, False) for k in BLOCKS] + [("mamba2", True), ("intra_hybrid", True)])
def test_compiled_block_equals_eager_values_and_grads(kind, documents):
    """aot_eager: dynamo + AOTAutograd's traced forward/backward (custom ops through their fake
    and autograd registrations), without Inductor's code generation (slow on CPU). The compiled conv
    runs as taps (masked with documents); the eager one is F.conv1d (recomputing the outputs after each
    start with documents): another summation order wherever a Mamba2 mixer is."""
    block = tiny_block(kind)
    x, pos = inputs(block.mixer_norm.weight.shape[0], documents)

    def run(module):
        block.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        out = module(xi, pos)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
        return [out.detach(), xi.grad] + [p.grad for p in block.parameters() if p.grad is not None]

    eager = run(block)
    torch._dynamo.reset()
    compiled = run(torch.compile(block, backend="aot_eager", fullgraph=True))
    assert len(eager) == len(compiled) > 3
    conv = any(isinstance(m, Mamba2) for m in block.modules())
    tol = {"rtol": 1e-4, "atol": 1e-5} if conv else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, **tol)


def test_grouped_mm_custom_op_opcheck_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    offsets = torch.tensor([3, 3, 10])  # the middle expert gets no rows
    torch.library.opcheck(torch.ops.pretrain.grouped_mm.default, (x, w, offsets))
    torch.autograd.gradcheck(lambda a, b: torch.ops.pretrain.grouped_mm(a, b, offsets), (x, w))
    dy = torch.randn(10, 4, dtype=torch.float64, generator=g)
    y = torch.ops.pretrain.grouped_mm(x, w, offsets)
    spans = ((0, 3), (3, 3), (3, 10))  # each expert's rows, written out (on CPU the op is the reference)
    torch.testing.assert_close(y, torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(spans)]))
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    torch.testing.assert_close(dw, torch.stack([x[s:e].detach().T @ dy[s:e] for s, e in spans]))
    torch.testing.assert_close(dx, torch.cat([dy[s:e] @ w[i].detach().T for i, (s, e) in enumerate(spans)]))
    assert dw[1].abs().max() == 0


def test_gpu_custom_ops_fake_shapes():
    """The SSD and conv ops run on CUDA only (their kernels' numerics are tests/gpu); their fake
    kernels, which compile relies on for shapes and dtypes, answer on meta tensors."""
    b, l, h, p, g, n = 2, 40, 4, 8, 1, 16
    meta = {"device": "meta"}
    # x as Mamba2 passes it: a transposed conv output (not contiguous); outputs are contiguous
    x, dt = torch.empty(b, h * p, l, dtype=torch.bfloat16, **meta).transpose(1, 2).unflatten(2, (h, p)), torch.empty(b, l, h, **meta)
    A, B = torch.empty(h, **meta), torch.empty(b, l, g, n, dtype=torch.bfloat16, **meta)
    y, state = torch.ops.pretrain.ssd_scan(x, dt, A, B, B, 16, None, None)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.is_contiguous() and not x.is_contiguous()
    assert state.shape == (b, h, p, n) and state.dtype == torch.float32
    grads = torch.ops.pretrain.ssd_scan_backward(y, state, x, dt, A, B, B, y, 16, None, None)
    assert [t.shape for t in grads[:5]] == [x.shape, dt.shape, A.shape, B.shape, B.shape] and grads[5].numel() == 0
    assert all(t.is_contiguous() for t in grads)
    xc = torch.empty(b, l, 24, **meta).transpose(1, 2)
    yc = torch.ops.pretrain.causal_conv1d(xc, torch.empty(24, 4, **meta), None, torch.empty(b, l, dtype=torch.int32, **meta))
    assert yc.shape == xc.shape and yc.is_contiguous()
