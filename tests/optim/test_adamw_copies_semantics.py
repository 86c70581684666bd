"""AdamWWithCopies (pretrain/optim) and WorkingCopies (parallel/mixed_precision) against torch's AdamW
in the cases the trainer meets beyond a plain step: torch.distributed.checkpoint's state dicts (and
the zero-gradient, lr-0 step with which `get_state_dict` initialises an empty optimizer), a
parameter shared by two modules, a frozen parameter, a parameter left without a gradient, a step
skipped with zero_grad, an LR scheduler, loading a fused AdamW's state, and gradient norms of any dtype."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from parallel.grad_norm import clip_grad_norm_, grad_norm
from parallel.mixed_precision import WorkingCopies, cast_parameters
from pretrain.optim import AdamWWithCopies, initialise_state

OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


class Net(nn.Module):
    """Two linears sharing one weight (a tied parameter held by two modules), a frozen gain, and a
    bias that only `use_extra` reaches (a parameter that may get no gradient)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 8), requires_grad=False)
        self.extra = nn.Parameter(torch.randn(8) * 0.1)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        x = x.to(self.a.weight.dtype)  # bf16 inside the swap, as the model's embedding makes it
        h = torch.tanh(self.b(torch.tanh(self.a(x)))) * self.gain
        if use_extra:
            h = h + self.extra
        return self.out(h).float().square().mean()


def nets():
    torch.manual_seed(0)
    ref = Net()
    net = copy.deepcopy(ref)
    return ref, net


def trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def batch(i: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(10 + i))


def assert_same(ref: nn.Module, net: nn.Module, copies: WorkingCopies, ref_opt, opt) -> None:
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(copies.of(a), a.detach().to(torch.bfloat16)), name
    for a, b in zip(trainable(net), trainable(ref)):
        sa, sb = opt.state.get(a, {}), ref_opt.state.get(b, {})
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tied_frozen_and_gradientless_parameters_step_as_torch_adamw_with_a_scheduler():
    ref, net = nets()
    copies = WorkingCopies(net, torch.bfloat16)
    assert len(copies.masters) == 5  # the tied weight once, the frozen gain too (the model reads its copy)
    assert copies.of(net.a.weight) is copies.of(net.b.weight)
    assert not copies.of(net.gain).requires_grad
    ref_opt = torch.optim.AdamW(trainable(ref), **OPTIONS)
    opt = AdamWWithCopies(trainable(net), copies, **OPTIONS)
    halve = lambda step: 0.5 ** step  # noqa: E731
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, halve)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, halve)
    for step, (use_extra, scale) in enumerate([(True, 1.0), (False, 0.5), (True, 0.25), (False, 1.0)]):
        with cast_parameters(ref, torch.bfloat16):
            ref(batch(step), use_extra).backward()
        with copies.swapped():
            net(batch(step), use_extra).backward()
        assert (copies.grad(net.extra) is None) == (not use_extra)
        torch._foreach_mul_([p.grad for p in ref.parameters() if p.grad is not None], scale)
        ref_opt.step()
        opt.step(grad_scale=scale)
        ref_opt.zero_grad()
        opt.zero_grad()
        ref_sched.step()
        sched.step()
        assert_same(ref, net, copies, ref_opt, opt)
    assert float(opt.state[net.extra]["step"]) == 2  # stepped only when it had a gradient
    assert torch.equal(net.gain, ref.gain) and net.gain.grad is None


def test_a_skipped_step_leaves_no_gradient_behind():
    _, net = nets()
    copies = WorkingCopies(net, torch.bfloat16)
    opt = AdamWWithCopies(trainable(net), copies, **OPTIONS)
    for micro in range(2):  # accumulated on the masters in fp32, then a copy's own
        with copies.swapped():
            net(batch(micro)).backward()
        if micro == 0:
            copies.accumulate()
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()  # the trainer's skipped step: no optimizer step
    assert all(copies.grad(p) is None for p in copies.masters)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))
    assert not opt.state


def run_steps(net: Net, copies: WorkingCopies, opt: AdamWWithCopies, steps: range) -> None:
    for step in steps:
        with copies.swapped():
            net(batch(step), use_extra=step % 2 == 0).backward()
        opt.step(grad_scale=0.5)
        opt.zero_grad()


def fresh():
    torch.manual_seed(0)
    net = Net()
    copies = WorkingCopies(net, torch.bfloat16)
    return net, copies, AdamWWithCopies(trainable(net), copies, **OPTIONS)


def test_dcp_state_dict_round_trip_and_its_initialising_step():
    net, copies, opt = fresh()
    run_steps(net, copies, opt, range(3))
    model_sd, optim_sd = (copy.deepcopy(sd) for sd in get_state_dict(net, opt))

    other, other_copies, other_opt = fresh()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)  # weights the checkpoint must replace
    other_copies.sync()
    before = [p.detach().clone() for p in other.parameters()]
    # the trainer's resume: get_state_dict first (it initialises the empty optimizer with a zero-gradient
    # step at lr 0), then load
    get_state_dict(other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), before)), "the initialising step moved a weight"
    assert all(p.grad is None for p in other.parameters())
    assert all(other_copies.grad(p) is None for p in other_copies.masters)
    assert [g["lr"] for g in other_opt.param_groups] == [OPTIONS["lr"]]
    set_state_dict(other, other_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    other_copies.sync()

    run_steps(net, copies, opt, range(3, 6))
    run_steps(other, other_copies, other_opt, range(3, 6))
    for (name, a), b in zip(net.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(other_copies.of(b), b.detach().to(torch.bfloat16)), name
    for a, b in zip(trainable(net), trainable(other)):
        assert all(torch.equal(opt.state[a][k], other_opt.state[b][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_initialised_state_is_step_zero_and_what_follows_is_unchanged():
    """`initialise_state` (the trainer's, when it builds the optimizer): weights and copies as they
    were, every count and moment 0, no gradient left; a save before the first step then takes no
    step of its own, and the steps after it equal a never-initialised optimizer's. One that has
    state already is left alone."""
    net, copies, opt = fresh()
    ref, ref_copies, ref_opt = fresh()
    before = [p.detach().clone() for p in net.parameters()]
    initialise_state(opt)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))
    assert all(torch.equal(copies.of(p), p.detach().to(torch.bfloat16)) for p in trainable(net))
    assert len(opt.state) == len(trainable(net)) and all(p.grad is None for p in net.parameters())
    assert all(s["step"].item() == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
               for s in opt.state.values())
    assert [g["lr"] for g in opt.param_groups] == [OPTIONS["lr"]]
    get_state_dict(net, opt)
    run_steps(net, copies, opt, range(3))
    run_steps(ref, ref_copies, ref_opt, range(3))
    assert_same(ref, net, copies, ref_opt, opt)
    initialise_state(opt)
    assert_same(ref, net, copies, ref_opt, opt)


def test_a_fused_adamw_state_dict_does_not_make_the_copies_optimizer_fused():
    """Checkpoints of torch's fused AdamW (every CUDA run before working copies, and FSDP runs) carry
    `fused: True` in their param groups, and Optimizer.load_state_dict takes the saved groups'
    options: AdamWWithCopies (which refuses fused=True) must not inherit it, nor the device-side
    `step` tensors fused implies (a host sync per parameter in its per-parameter kernel path)."""
    torch.manual_seed(0)
    ref = Net()
    ref_opt = torch.optim.AdamW(trainable(ref), **OPTIONS, fused=True)
    ref(batch(0)).backward()
    ref_opt.step()
    net, copies, opt = fresh()
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    assert not any(g["fused"] for g in opt.param_groups)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grad_norm_of_any_floating_dtype(dtype):
    grads = [torch.tensor([3.0, 0.0], dtype=dtype), torch.tensor([[4.0]], dtype=dtype)]
    assert float(grad_norm(grads)) == 5.0
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    assert float(clip_grad_norm_(params, 1.0)) == 5.0
    atol = 4e-3 if dtype == torch.bfloat16 else 1e-6  # 0.6 in bf16 is 0.6016
    assert torch.allclose(params[0].grad.double(), torch.tensor([0.6, 0.0], dtype=torch.float64), atol=atol)


def test_a_foreach_state_dict_leaves_torch_adamw_fused():
    """The trainer's torch AdamW (FSDP runs) loading a working-copies checkpoint (saved with fused None)."""
    from pretrain.optim import keep_implementation_on_load

    torch.manual_seed(0)
    net, copies, opt = fresh()
    with copies.swapped():
        net(batch(0)).backward()
    opt.step()
    fused = torch.optim.AdamW(trainable(Net()), **OPTIONS, fused=True)
    keep_implementation_on_load(fused)
    fused.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(g["fused"] for g in fused.param_groups)


def test_a_state_dict_with_other_groups_is_still_refused():
    """Keeping the implementation options must not hide a mismatch in the number of param groups."""
    from pretrain.optim import keep_implementation_on_load

    net = Net()
    two = torch.optim.AdamW([{"params": [net.a.weight]}, {"params": [net.extra]}], **OPTIONS)
    one = torch.optim.AdamW([net.a.weight, net.extra], **OPTIONS)
    keep_implementation_on_load(one)
    with pytest.raises(ValueError, match="parameter groups"):
        one.load_state_dict(two.state_dict())
