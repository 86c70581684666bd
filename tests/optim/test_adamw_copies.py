"""AdamWWithCopies (pretrain/optim): on the CPU its reference path must step exactly as torch's
AdamW does on the same gradients delivered through differentiable casts (parallel/mixed_precision),
keep the copies equal to the masters, and share torch's state format."""
from __future__ import annotations

import copy

import pytest
import torch

from parallel.grad_norm import clip_coefficient, clip_grad_norm_, grad_norm
from parallel.mixed_precision import WorkingCopies, cast_parameters
from pretrain.model import build_model
from pretrain.optim import AdamWWithCopies

OPTIONS = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def model_and_batches(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("hybrid_moe", "tiny", pattern="MA")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (2, 33), generator=g) for _ in range(6)]
    return model, batches


def loss_of(model, tokens):
    return model.loss(tokens[:, :-1], tokens[:, 1:])


def train_cast_path(steps: int, max_norm: float, micro: int = 1):
    """The previous one-process path: differentiable casts, clipping in place, torch's AdamW."""
    model, batches = model_and_batches()
    opt = torch.optim.AdamW(model.parameters(), **OPTIONS)
    norms = []
    for step in range(steps):
        for i in range(micro):
            with cast_parameters(model, torch.bfloat16):
                loss_of(model, batches[(step * micro + i) % len(batches)]).backward()
        norms.append(float(clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        opt.zero_grad()
        for moe in model.moe_layers():
            moe.update_bias()
    return model, opt, norms


def train_copies_path(steps: int, max_norm: float, micro: int = 1):
    model, batches = model_and_batches()
    copies = WorkingCopies(model, torch.bfloat16)
    opt = AdamWWithCopies(model.parameters(), copies, **OPTIONS)
    norms = []
    for step in range(steps):
        for i in range(micro):
            with copies.swapped():
                loss_of(model, batches[(step * micro + i) % len(batches)]).backward()
            if micro > 1:
                copies.accumulate()
        total = grad_norm([g for p in copies.masters if (g := copies.grad(p)) is not None])
        norms.append(float(total))
        opt.step(grad_scale=clip_coefficient(total, max_norm))
        opt.zero_grad()
        for moe in model.moe_layers():
            moe.update_bias()
    return model, opt, copies, norms


@pytest.mark.parametrize("micro", [1, 2], ids=["one-micro-batch", "accumulated"])
def test_copies_path_steps_exactly_as_casts_and_torch_adamw(micro):
    # a max norm the gradients exceed: the optimizer's grad_scale must clip as the in-place scale does
    ref, ref_opt, ref_norms = train_cast_path(3, 0.05, micro)
    model, opt, copies, norms = train_copies_path(3, 0.05, micro)
    assert max(ref_norms) > 0.05
    assert norms == pytest.approx(ref_norms, rel=1e-6)  # the norm's summation order differs
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(copies.of(a), a.detach().to(torch.bfloat16), rtol=0, atol=0, msg=name)
    for a, b in zip(opt.state.values(), ref_opt.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_copies_carry_the_gradients_and_zero_grad_clears_them():
    model, batches = model_and_batches()
    copies = WorkingCopies(model, torch.bfloat16)
    opt = AdamWWithCopies(model.parameters(), copies, **OPTIONS)
    with copies.swapped():
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        loss_of(model, batches[0]).backward()
    assert all(p.grad is None for p in model.parameters())  # on the copies, in bf16
    assert all(copies.grad(p).dtype == torch.bfloat16 for p in copies.masters)
    opt.zero_grad()
    assert all(copies.grad(p) is None for p in copies.masters)


def test_torch_adamw_state_loads_and_steps_alike():
    ref, ref_opt, _ = train_cast_path(2, 1.0)
    copies_model, batches = model_and_batches()
    copies = WorkingCopies(copies_model, torch.bfloat16)
    opt = AdamWWithCopies(copies_model.parameters(), copies, **OPTIONS)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # load_state_dict would share the tensors
    copies_model.load_state_dict(ref.state_dict())
    copies.sync()
    for (_, a), b in zip(copies_model.named_parameters(), ref.parameters()):
        assert torch.equal(copies.of(a), b.detach().to(torch.bfloat16))
    # one more step each from the same state: the same parameters
    for m, step in ((ref, lambda: ref_opt.step()), (copies_model, lambda: opt.step())):
        with (cast_parameters(m, torch.bfloat16) if m is ref else copies.swapped()):
            loss_of(m, batches[2]).backward()
        step()
    for a, b in zip(copies_model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_refuses_options_it_does_not_implement():
    model, _ = model_and_batches()
    with pytest.raises(ValueError, match="amsgrad"):
        AdamWWithCopies(model.parameters(), WorkingCopies(model, torch.bfloat16), amsgrad=True)
