"""Parameter names of checkpoints saved before the model's layout changed, and how they convert.

Two refactors renamed parameters: Mamba2's packed `in_proj` (rows [z, x, B, C, dt]) and conv
(`conv_weight` / `conv_bias`, channels [x, B, C]) were split into one module per part (so each
has one placement under tensor parallelism), and the MoE's stacked expert weights (`w1`, `w2`,
`w3`) moved into `experts` (so expert parallelism can place them). Every change is "the tensor
saved as `old` is the concatenation along dim 0 of these new tensors" (a rename is one part), so
one table of `Split`s converts a plain state dict (`convert`, called by the modules' load hooks)
and a DCP checkpoint (`pretrain.checkpoint`, which also applies it to the optimizer's moments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAMBA_PARTS = ("z", "x", "B", "C", "dt")


@dataclass(frozen=True)
class Split:
    """The tensor saved as `old` holds the parts `new` (name, rows) stacked along dim 0, in order."""

    old: str
    new: tuple[tuple[str, int], ...]

    def parts(self, t: Tensor) -> list[tuple[str, Tensor]]:
        """`t` (saved as `old`, or any tensor of its shape) cut into the new names' tensors."""
        if t.shape[0] != sum(rows for _, rows in self.new):
            raise ValueError(f"{self.old} has {t.shape[0]} rows, the split {self.new} needs "
                             f"{sum(rows for _, rows in self.new)}: the checkpoint is of another model")
        return [(name, p) for (name, _), p in zip(self.new, t.split([rows for _, rows in self.new]))]


def mamba_splits(prefix: str, n_heads: int, d_ssm: int, gn: int, external_x: bool) -> list[Split]:
    """One Mamba2 mixer's packed tensors: in_proj rows [z, x, B, C, dt] (x absent when external),
    conv channels [x, B, C]."""
    rows = {"z": d_ssm, "x": d_ssm, "B": gn, "C": gn, "dt": n_heads}
    proj = tuple((f"{prefix}{n}_proj.weight", rows[n]) for n in MAMBA_PARTS if not (external_x and n == "x"))
    convs = [Split(f"{prefix}conv_{kind}", tuple((f"{prefix}conv_{n}.{kind}", rows[n]) for n in "xBC"))
             for kind in ("weight", "bias")]
    return [Split(f"{prefix}in_proj.weight", proj), *convs]


def moe_splits(prefix: str, n_experts: int) -> list[Split]:
    """The routed experts' stacked weights, saved on the MoE itself before the split."""
    return [Split(f"{prefix}{w}", ((f"{prefix}experts.{w}", n_experts),)) for w in ("w1", "w2", "w3")]


def legacy_splits(cfg) -> list[Split]:
    """Every conversion of a whole model's state (keys as `HybridLM.state_dict()`), from its
    ModelConfig `cfg` alone."""
    out: list[Split] = []
    for i, symbol in enumerate(cfg.blocks):
        block = f"blocks.{i}."
        if symbol == "M":
            out += mamba_splits(block + "mixer.", cfg.ssm_heads, cfg.d_ssm, cfg.n_groups * cfg.d_state, False)
        elif symbol == "H":
            ic = cfg.intra
            out += mamba_splits(block + "mixer.ssm.", ic.ssm_heads, ic.ssm_width, cfg.n_groups * ic.d_state,
                                ic.value_sharing)
        if cfg.moe is not None:
            out += moe_splits(block + "ffn.", cfg.moe.n_experts)
    return out


def convert(state: dict[str, Tensor], splits: list[Split]) -> None:
    """Rewrite the old-named tensors of a plain state dict into the new names, in place."""
    for s in splits:
        if s.old in state:
            state.update(s.parts(state.pop(s.old)))


def to_legacy(state: dict[str, Tensor], splits: list[Split]) -> None:
    """The inverse of `convert`, in place: how the old code saved this state (the tests write old
    checkpoints with it)."""
    for s in splits:
        if all(name in state for name, _ in s.new):
            state[s.old] = torch.cat([state.pop(name) for name, _ in s.new])
