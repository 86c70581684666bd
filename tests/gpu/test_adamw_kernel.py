"""The fused AdamW-with-copy Triton kernel (pretrain/optim/adamw_triton.py) against torch's AdamW on
the same GPU: same masters and moments within fp32 rounding, copies exactly the masters in bf16."""
import pytest
import torch

from parallel.mixed_precision import WorkingCopies
from pretrain.optim import AdamWWithCopies, initialise_state
from pretrain.optim.adamw_triton import kernel_applies

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Params(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # sizes off the kernel's 2048-element blocks, a vector, a 3-D expert stack
        self.a = torch.nn.Parameter(torch.randn(1000, 77) * 0.02)
        self.b = torch.nn.Parameter(torch.ones(333))
        self.c = torch.nn.Parameter(torch.randn(4, 64, 96) * 0.02)


def test_fused_step_matches_torch_adamw():
    torch.manual_seed(0)
    fast, ref = Params().cuda(), Params().cuda()
    ref.load_state_dict(fast.state_dict())
    copies = WorkingCopies(fast, torch.bfloat16)
    groups = lambda m: [{"params": [m.a, m.c], "weight_decay": 0.1}, {"params": [m.b], "weight_decay": 0.0}]  # noqa: E731
    opt = AdamWWithCopies(groups(fast), copies, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    for step, scale in enumerate((1.0, 0.37, 1.0)):
        for g in (*opt.param_groups, *ref_opt.param_groups):
            g["lr"] = 1e-3 * (step + 1)  # as a schedule changes it
        for p, r in zip(fast.parameters(), ref.parameters()):
            grad = (torch.randn_like(p) * 0.1).to(torch.bfloat16)
            copies.of(p).grad = grad
            r.grad = grad.float() * scale
            assert kernel_applies(p, grad, copies.of(p))
        opt.step(grad_scale=scale)
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for (name, p), r in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
        assert torch.equal(copies.of(p), p.detach().to(torch.bfloat16)), name
        for key in ("exp_avg", "exp_avg_sq"):
            # fp32 rounding (torch rounds after each foreach op, the kernel may fuse a multiply-add);
            # the moments are ~1e-2 (exp_avg) and ~1e-4 (exp_avg_sq) here
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[r][key], rtol=1e-5, atol=1e-8,
                                       msg=lambda m: f"{name} {key}: {m}")
        assert float(opt.state[p]["step"]) == 3


@pytest.mark.parametrize("kind", ["fused", "copies"])
def test_initialised_state_changes_no_weight_and_counts_from_zero(kind):
    """`initialise_state` on the GPU's optimizers (torch's fused AdamW; the copies' Triton kernel):
    its zero step at lr 0 leaves every weight and copy bit for bit, the counts at 0, and three steps
    after it equal three of an optimizer built without it."""
    torch.manual_seed(0)
    nets = [Params().cuda() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    copies = [WorkingCopies(m, torch.bfloat16) if kind == "copies" else None for m in nets]
    groups = lambda m: [{"params": [m.a, m.c], "weight_decay": 0.1}, {"params": [m.b], "weight_decay": 0.0}]  # noqa: E731
    opts = [AdamWWithCopies(groups(m), c, lr=1e-3) if kind == "copies" else
            torch.optim.AdamW(groups(m), lr=1e-3, fused=True) for m, c in zip(nets, copies)]
    before = [p.detach().clone() for p in nets[0].parameters()]
    initialise_state(opts[0])
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), before))
    assert all(s["step"].item() == 0 for s in opts[0].state.values()) and len(opts[0].state) == 3
    if kind == "copies":
        assert all(torch.equal(copies[0].of(p), p.detach().to(torch.bfloat16)) for p in nets[0].parameters())
    for step in range(3):
        grads = [torch.randn_like(p) * 0.1 for p in nets[0].parameters()]
        for m, c, opt in zip(nets, copies, opts):
            for p, g in zip(m.parameters(), grads):
                if c is not None:
                    c.of(p).grad = g.to(torch.bfloat16)
                else:
                    p.grad = g.clone()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in nets)))
