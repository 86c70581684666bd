"""Pipeline-parallel machinery on torch.distributed.pipelining: which schedule, which stages a
pipeline rank holds, the schedule's bubble, and running one batch through the stages.

The model side (what a stage holds) is the caller's; here a stage is any module whose forward
takes the previous stage's output (the first stage: the batch's inputs), takes keyword inputs
that every stage receives (split on the batch like the inputs), and, on the last stage, returns
the microbatch's mean loss. A stage module may also define `side_loss()`: loss terms of its last
forward that its output does not carry (e.g. an earlier stage's MoE balance losses); they join
that stage's backward, scaled as the last stage's loss, and the loss `Pipeline.run` reports.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.pipelining as pipelining
import torch.nn as nn
from torch import Tensor

from parallel.split_backward import transitive_param_groups

# name -> (torch class, layout of a rank's stages: "loop" r, r+pp, ... or "v" r and 2pp-1-r)
SCHEDULES: dict[str, tuple[str, str]] = {
    "1f1b": ("Schedule1F1B", "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}


# schedules that run each stage's backward in two halves (input gradients, then weight gradients)
SPLIT_BACKWARD = tuple(name for name, (_, layout) in SCHEDULES.items() if layout == "v")


# The V schedules' weight pass (`torch.distributed.pipelining._backward.stage_backward_weight`) runs
# one gradient per parameter group; before torch 2.13 it neither handled an intermediate with several
# outputs nor kept a group's intermediates that descend from one another from counting twice, and
# on torch 2.11 our models' groups (`parallel.split_backward`) stop in it (CPU, gloo: "Attribute
# '_input_metadata' is invalid for this instance of _C._FunctionBase").
SPLIT_BACKWARD_TORCH = (2, 13)


def torch_release() -> tuple[int, int]:
    """(major, minor) of the running torch, e.g. (2, 11) for 2.11.0+cu130."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def too_old_for(schedule: str) -> bool:
    """Whether `schedule` splits its backward and this torch is older than SPLIT_BACKWARD_TORCH."""
    return schedule in SPLIT_BACKWARD and torch_release() < SPLIT_BACKWARD_TORCH


def available_schedules() -> list[str]:
    """The schedules this torch runs: its pipelining module has the class (DualPipeV appeared after
    ZBV), and it is new enough for the split-backward ones."""
    return [name for name, (cls, _) in SCHEDULES.items() if hasattr(pipelining, cls) and not too_old_for(name)]


def stages_per_rank(schedule: str, marked_stages: int | None, pp: int) -> int:
    """Stages each pipeline rank holds: 1 for 1F1B, 2 for the V schedules, and for interleaved
    1F1B the pattern's marked stages per rank (2 when unmarked)."""
    if schedule == "1f1b":
        return 1
    if SCHEDULES[schedule][1] == "v":
        return 2
    return marked_stages // pp if marked_stages else 2


def check_schedule(schedule: str, pp: int, microbatches: int, local_batch: int) -> None:
    """Refuse, with the config field and the fix, what a schedule cannot run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r} is unknown: choose one of {', '.join(SCHEDULES)}")
    if too_old_for(schedule):
        needed = ".".join(map(str, SPLIT_BACKWARD_TORCH))
        raise ValueError(f"parallel.pp_schedule={schedule!r} needs torch >= {needed} (the weight pass of earlier "
                         "releases' split backward mishandles these models' parameter groups; torch 2.11 stops in it): "
                         f"upgrade torch or use one of {', '.join(available_schedules())}")
    if schedule not in available_schedules():
        raise ValueError(f"parallel.pp_schedule={schedule!r} needs torch.distributed.pipelining."
                         f"{SCHEDULES[schedule][0]}, which torch {torch.__version__} lacks: use one of "
                         f"{', '.join(available_schedules())}")
    if microbatches < pp:
        raise ValueError(f"parallel.pp_microbatches={microbatches} must be >= parallel.pp={pp} (else the pipeline "
                         "never fills); raise it")
    if schedule in ("interleaved_1f1b", "zbv") and microbatches % pp:
        raise ValueError(f"parallel.pp_microbatches={microbatches} must be a multiple of parallel.pp={pp} for "
                         f"parallel.pp_schedule={schedule}")
    if schedule == "dualpipev" and microbatches < 2 * pp:
        raise ValueError(f"parallel.pp_microbatches={microbatches} must be >= 2 x parallel.pp={2 * pp} for "
                         "parallel.pp_schedule=dualpipev")
    if local_batch % microbatches:
        raise ValueError(f"parallel.pp_microbatches={microbatches} must divide train.micro_batch_size={local_batch} "
                         "(each pipeline microbatch is a slice of it); change one of them")


def local_stage_ids(schedule: str, pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The global stage indices pipeline rank `pp_rank` holds, in execution order."""
    if SCHEDULES[schedule][1] == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(per_rank)]


def bubble_fraction(schedule: str, pp: int, microbatches: int, per_rank: int) -> float:
    """Textbook idle fraction of a rank's step for equal forward and backward times per stage:
    1F1B (p-1)/(m+p-1), with v stages per rank (p-1)/(v m+p-1). The zero-bubble V schedules do
    better than this by filling the warm-up with weight-gradient work: `action_table_idle` reads
    what their actual action order leaves idle."""
    p, m, v = pp, microbatches, per_rank
    if schedule == "1f1b":
        return (p - 1) / (m + p - 1)
    return (p - 1) / (v * m + p - 1)


def action_table_idle(schedule: str, pp: int, microbatches: int, per_rank: int,
                      group: dist.ProcessGroup) -> list[float] | None:
    """Each pp rank's idle fraction in torch's own action table of a multi-stage schedule (one
    time slot per forward, backward, input- or weight-gradient action: equal costs); None for 1F1B,
    which keeps no table (its textbook figure is exact). Builds placeholder stages on `group` (a
    process group of pp ranks, e.g. the fake backend's); nothing is sent."""
    if schedule == "1f1b":
        return None
    rank = dist.get_rank(group)
    stages = [pipelining.PipelineStage(nn.Identity(), i, pp * per_rank, torch.device("cpu"), group=group)
              for i in local_stage_ids(schedule, rank, pp, per_rank)]
    order = getattr(pipelining, SCHEDULES[schedule][0])(stages, n_microbatches=microbatches,
                                                        loss_fn=lambda out, _: out).pipeline_order
    return [1 - sum(a is not None for a in order[r]) / len(order[r]) for r in range(pp)]


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them."""

    modules: list[nn.Module]  # this rank's stage modules, in `stage_ids` order
    stage_ids: list[int]
    n_stages: int
    schedule: object  # a torch.distributed.pipelining schedule
    microbatches: int
    loss_scale: list[float]  # what the schedule's loss function multiplies each microbatch loss by
    owners: list[int]  # the pp rank (in `group`) holding each stage
    group: dist.ProcessGroup
    device: torch.device
    side_losses: dict[int, list[Tensor]]  # per local stage, its side losses (detached) in this batch
    undo: list[_UndoMetadataForward]

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def run(self, inputs: Tensor, targets: Tensor, train: bool, accumulation: int = 1, **kwargs: Tensor) -> Tensor | None:
        """One batch through the pipeline: forward and backward when `train` (the gradients are
        those of the batch's mean loss divided by `accumulation`, added to what is there), else
        forward only (`forward_only`). `targets` and `kwargs` reach every stage as keyword inputs
        (the last stage computes its loss from them: no full logits leave it). Returns this rank's
        part of the batch's mean loss (summed over the pipeline group, the loss): the last
        stage's loss and its stages' side losses; None on a rank with neither."""
        if not train:
            return self.forward_only(inputs, targets=targets, **kwargs)
        losses: list[Tensor] = []
        self.side_losses.clear()
        for undo in self.undo:
            undo.calls = 0
        self.loss_scale[0] = 1 / (self.microbatches * accumulation)
        args = (inputs,) if self.has_first else ()
        extra = {"return_outputs": False} if _accepts(self.schedule.step, "return_outputs") else {}
        with transitive_param_groups():  # the V schedules' split backward, grouped correctly
            self.schedule.step(*args, target=targets if self.has_last else None,
                               losses=losses if self.has_last else None, targets=targets, **extra, **kwargs)
        for undo in self.undo:
            undo.finish(self.microbatches)
        parts = [torch.stack(losses).detach().double().mean() / self.loss_scale[0]] if self.has_last else []
        for sides in self.side_losses.values():  # the last microbatches' (the first step also runs
            # torch's metadata inference: one forward per stage on placeholder inputs, before them)
            parts.append(torch.stack(sides[-self.microbatches:]).double().sum() / self.microbatches)
        return sum(parts[1:], parts[0]) if parts else None

    @torch.no_grad()
    def forward_only(self, inputs: Tensor, **kwargs: Tensor) -> Tensor | None:
        """The whole batch stage after stage, without the schedule: with no backward there is
        nothing to overlap, and torch's V schedules cannot run forward only (their `eval` asks
        for backward buffers in torch 2.13). Returns the last stage's output on its rank."""
        out = self.through(lambda module, _stage, x: module(x, **kwargs), inputs)
        return out.double() if out is not None else None

    def through(self, fn: Callable[[nn.Module, int, Tensor], Tensor], inputs: Tensor) -> Tensor | None:
        """One forward through every stage in order, outside the schedule: stage s's owner runs
        `fn(its module, s, input)` on the previous stage's output (received from its owner; the
        first stage gets `inputs`) and sends the result on. Every pp rank calls it; returns the
        last stage's output on its rank, None elsewhere. For forward-only work (validation,
        decoding a token at a time), where there is no backward to overlap."""
        me, x = dist.get_rank(self.group), inputs
        for s, owner in enumerate(self.owners):
            if owner != me:
                continue
            if s > 0 and self.owners[s - 1] != me:
                x = _recv(dist.get_global_rank(self.group, self.owners[s - 1]), self.group, self.device)
            x = fn(self.modules[self.stage_ids.index(s)], s, x)
            if s < self.n_stages - 1 and self.owners[s + 1] != me:
                _send(x, dist.get_global_rank(self.group, self.owners[s + 1]), self.group)
        return x if self.has_last else None

    def broadcast_from_last(self, t: Tensor | None) -> Tensor:
        """The last stage's `t` on every pp rank (shape and dtype sent along: others pass None)."""
        src = dist.get_global_rank(self.group, self.owners[-1])
        header = torch.zeros(8, dtype=torch.int64, device=self.device)
        if self.has_last:
            header.copy_(_header(t))
        dist.broadcast(header, src=src, group=self.group)
        out = t.contiguous() if self.has_last else _empty_for(header, self.device)
        dist.broadcast(out, src=src, group=self.group)
        return out


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64)


def _header(t: Tensor) -> Tensor:
    """A tensor's dtype, rank and shape (up to 6 dims) as 8 int64, sent ahead of it."""
    return torch.tensor([_DTYPES.index(t.dtype), t.ndim, *t.shape] + [0] * (6 - t.ndim), dtype=torch.int64,
                        device=t.device)


def _empty_for(header: Tensor, device: torch.device) -> Tensor:
    """An uninitialised tensor of the dtype and shape `_header` packed, for the receiver to fill."""
    code, ndim, *shape = header.tolist()
    return torch.empty(shape[:ndim], dtype=_DTYPES[code], device=device)


def _send(t: Tensor, dst: int, group: dist.ProcessGroup) -> None:
    dist.send(_header(t), dst=dst, group=group)
    dist.send(t.contiguous(), dst=dst, group=group)


def _recv(src: int, group: dist.ProcessGroup, device: torch.device) -> Tensor:
    header = torch.empty(8, dtype=torch.int64, device=device)
    dist.recv(header, src=src, group=group)
    out = _empty_for(header, device)
    dist.recv(out, src=src, group=group)
    return out


class _JoinLoss(torch.autograd.Function):
    """Identity on a stage's output whose backward also seeds the stage's side loss with
    d(objective)/d(side loss) = `scale`: the schedule runs the stage's backward from its output
    alone, and the side loss joins it there."""

    @staticmethod
    def forward(ctx, output: Tensor, side: Tensor, scale: float) -> Tensor:
        ctx.scale, ctx.side_shape, ctx.side_dtype = scale, side.shape, side.dtype
        return output.clone()  # not a view: torch.distributed.pipelining detaches stage outputs in place

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        return grad, torch.full(ctx.side_shape, ctx.scale, dtype=ctx.side_dtype, device=grad.device), None


def _join_side_loss(module: nn.Module, scale: list[float], record: dict[int, list[Tensor]], key: int):
    """A forward hook adding `module.side_loss()` to the objective through the stage's backward."""

    def hook(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        side = module.side_loss()
        if side is None or not torch.is_grad_enabled():
            return output
        record.setdefault(key, []).append(side.detach())
        return _JoinLoss.apply(output, side, scale[0])

    return hook


class _UndoMetadataForward:
    """torch's pipelining infers a stage's shapes in its first step with one extra forward (on the
    first microbatch, or on uninitialised placeholders past the first stage): what that forward
    added to the stage's non-persistent buffers (counters, e.g. MoE expert loads) is taken back
    after the step. Recognised by the count: a step with one forward more than its microbatches."""

    def __init__(self, module: nn.Module):
        self.module, self.calls, self.before, self.delta = module, 0, [], []
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _counters(self) -> list[Tensor]:
        return [b for m in self.module.modules() for name, b in m.named_buffers(recurse=False)
                if name in m._non_persistent_buffers_set]

    def _pre(self, *_args) -> None:
        self.calls += 1
        if self.calls == 1:
            self.before = [b.clone() for b in self._counters()]

    def _post(self, *_args) -> None:
        if self.calls == 1:
            self.delta = [b - a for a, b in zip(self.before, self._counters())]

    @torch.no_grad()
    def finish(self, microbatches: int) -> None:
        if self.calls == microbatches + 1:
            for buffer, delta in zip(self._counters(), self.delta):
                buffer -= delta


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def build_pipeline(modules: list[nn.Module], stage_ids: list[int], n_stages: int, schedule: str, microbatches: int,
                   group: dist.ProcessGroup, device: torch.device) -> Pipeline:
    """Wrap this rank's stage modules (`stage_ids` from `local_stage_ids`) in the schedule. The last
    stage's output is its microbatch's mean loss; the schedule's loss function only scales it
    (scale_grads off: gradients are scaled here, so that accumulation over batches stays exact)."""
    stages = [pipelining.PipelineStage(m, i, n_stages, device, group=group) for m, i in zip(modules, stage_ids)]
    pp, per_rank = dist.get_world_size(group), len(stage_ids)
    owners = {s: r for r in range(pp) for s in local_stage_ids(schedule, r, pp, per_rank)}
    scale, side_losses = [1.0], {}
    for key, module in enumerate(modules):
        if hasattr(module, "side_loss"):
            module.register_forward_hook(_join_side_loss(module, scale, side_losses, key))

    def loss_fn(output: Tensor, _target: object) -> Tensor:
        return output * scale[0]

    cls = getattr(pipelining, SCHEDULES[schedule][0])
    sched = cls(stages[0] if schedule == "1f1b" else stages, n_microbatches=microbatches, loss_fn=loss_fn,
                scale_grads=False)
    return Pipeline(modules, stage_ids, n_stages, sched, microbatches, scale, [owners[s] for s in range(n_stages)], group,
                    device, side_losses, [_UndoMetadataForward(m) for m in modules])
