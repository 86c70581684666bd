"""The one dataclass a model is built from: sizes, a layer pattern and the study's ablation axes.

Accounting (`pretrain.accounting`) and the Hugging Face bridge read the same object, so a number
reported for a model is always the number of the model that gets built.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
import typing
from typing import Any

from pretrain.model.pattern import parse_pattern

NORMS = ("none", "rms", "group")
SCALINGS = ("none", "scalar", "vector", "gate", "diff")
FUSIONS = ("add", "subtract", "concat")
OUT_PROJS = ("unified", "separate")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeConfig:
    """RoPE with Llama 3 frequency scaling; `factor=None` turns the scaling off."""

    theta: float = 500000.0
    factor: float | None = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass
class MoEConfig:
    """1 shared + top-k of E routed experts, sigmoid router, aux-loss-free balancing (PAPER T4)."""

    n_experts: int = 8
    top_k: int = 1
    n_shared: int = 1
    d_expert: int | None = None  # None: d_ffn // 2 (expert width halved)
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0


@dataclass
class IntraConfig:
    """Intra-layer (parallel) hybrid mixer; defaults are the paper's winner (T6/T7).

    Widths are in heads: the attention branch has `attn_heads` query heads of `qk_head_dim` (Q/K,
    reduced, Differential-Transformer style) and `head_dim` (V, full); the Mamba branch has
    `ssm_heads` heads of `head_dim`, so with equal head counts both branch outputs have one width.
    """

    attn_heads: int = 16
    kv_heads: int = 4
    ssm_heads: int = 16
    head_dim: int = 144
    qk_head_dim: int = 72
    d_state: int = 128
    norm: str = "group"
    scaling: str = "none"
    fusion: str = "subtract"
    value_sharing: bool = False
    out_proj: str = "separate"

    @property
    def attn_width(self) -> int:
        return self.attn_heads * self.head_dim

    @property
    def ssm_width(self) -> int:
        return self.ssm_heads * self.head_dim


# sizes and counts that must be integers >= 1 (a 0 or a string would fail deep inside torch, or
# build a model without heads)
POSITIVE_INTS = ("vocab_size", "d_model", "d_ffn", "max_seq_len", "n_heads", "n_kv_heads", "head_dim", "window",
                 "d_ssm", "ssm_head_dim", "d_state", "n_groups", "d_conv", "chunk_size")
INTRA_POSITIVE_INTS = ("attn_heads", "kv_heads", "ssm_heads", "head_dim", "qk_head_dim", "d_state")


@dataclass
class ModelConfig:
    """Everything needed to build a `HybridLM`. `pattern` has one symbol per block (see pattern.py)."""

    pattern: str = "AAAA"
    vocab_size: int = 128256
    d_model: int = 2048
    d_ffn: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    max_seq_len: int = 8192
    # attention
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 64
    rope: RopeConfig = field(default_factory=RopeConfig)
    # sliding-window attention ('S' blocks): own RoPE base, no frequency scaling
    window: int = 512
    n_sink: int = 64
    swa_rope_theta: float = 10000.0
    # Mamba2 ('M' blocks)
    d_ssm: int = 4096
    ssm_head_dim: int = 128
    d_state: int = 128
    n_groups: int = 1
    d_conv: int = 4
    chunk_size: int = 256
    a_init_range: tuple[float, float] = (0.01, 2.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    # intra-hybrid ('H' blocks)
    intra: IntraConfig = field(default_factory=IntraConfig)
    # FFN: SwiGLU, or MoE in every block when `moe` is set
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        self.a_init_range = tuple(self.a_init_range)
        self.validate()

    @property
    def blocks(self) -> tuple[str, ...]:
        return parse_pattern(self.pattern).blocks

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def ssm_heads(self) -> int:
        return self.d_ssm // self.ssm_head_dim

    def validate(self) -> None:
        def need(ok: bool, name: str, fix: str) -> None:
            if not ok:
                raise ValueError(f"model config: field '{name}' is invalid: {fix}")

        wrong = type_problems(self)
        need(not wrong, wrong[0].split(" ")[0] if wrong else "", f"{'; '.join(wrong)} (fix the value)")
        parse_pattern(self.pattern)
        counts = {name: getattr(self, name) for name in POSITIVE_INTS}
        counts.update({f"intra.{name}": getattr(self.intra, name) for name in INTRA_POSITIVE_INTS})
        if self.moe is not None:
            counts.update({"moe.n_experts": self.moe.n_experts, "moe.top_k": self.moe.top_k})
            if self.moe.d_expert is not None:
                counts["moe.d_expert"] = self.moe.d_expert
        for name, v in counts.items():
            need(isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**31, name,
                 f"must be an integer in [1, 2**31) (got {v!r})")
        need(isinstance(self.n_sink, int) and self.n_sink >= 0, "n_sink", f"must be an integer >= 0 (got {self.n_sink!r})")
        for name in ("norm_eps", "init_std", "dt_min", "dt_max"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, f"must be a number > 0 (got {v!r})")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", "must divide n_heads")
        need(self.head_dim % 2 == 0, "head_dim", "must be even for RoPE")
        need(self.d_ssm % self.ssm_head_dim == 0, "d_ssm", "must be a multiple of ssm_head_dim")
        need(self.ssm_heads % self.n_groups == 0, "n_groups", "must divide d_ssm // ssm_head_dim")
        if "H" in self.blocks:  # the intra-hybrid's SSM branch has its own heads, B/C groups shared
            need(self.intra.ssm_heads % self.n_groups == 0, "n_groups",
                 f"must divide intra.ssm_heads={self.intra.ssm_heads} (the intra-hybrid's SSM heads)")
        need(self.d_conv >= 2, "d_conv", f"must be >= 2 (got {self.d_conv}): decoding keeps the last d_conv - 1 inputs")
        need(0 < self.a_init_range[0] <= self.a_init_range[1], "a_init_range", "use (low, high), 0 < low <= high")
        need(self.dt_min <= self.dt_max, "dt_min", f"must be <= dt_max (got {self.dt_min} > {self.dt_max})")
        r = self.rope
        for name, v in (("rope.theta", r.theta), ("rope.low_freq_factor", r.low_freq_factor),
                        ("rope.high_freq_factor", r.high_freq_factor), ("swa_rope_theta", self.swa_rope_theta)):
            need(math.isfinite(v) and v > 0, name, f"must be a number > 0 (got {v!r})")
        need(r.factor is None or (math.isfinite(r.factor) and r.factor > 0), "rope.factor",
             f"must be a number > 0 (got {r.factor!r})")
        need(r.original_context >= 1, "rope.original_context", f"must be an integer >= 1 (got {r.original_context!r})")
        i = self.intra
        need(i.norm in NORMS, "intra.norm", f"choose one of {NORMS}")
        need(i.scaling in SCALINGS, "intra.scaling", f"choose one of {SCALINGS}")
        need(i.fusion in FUSIONS, "intra.fusion", f"choose one of {FUSIONS}")
        need(i.out_proj in OUT_PROJS, "intra.out_proj", f"choose one of {OUT_PROJS}")
        need(i.attn_heads % i.kv_heads == 0, "intra.kv_heads", "must divide intra.attn_heads")
        need(i.qk_head_dim % 2 == 0, "intra.qk_head_dim", "must be even for RoPE")
        if i.fusion != "concat" and i.out_proj == "unified":
            need(i.attn_width == i.ssm_width, "intra.out_proj",
                 "add/subtract before a unified projection needs attn_heads == ssm_heads")
        if i.value_sharing:
            need(i.attn_width == i.ssm_width, "intra.value_sharing", "needs attn_heads == ssm_heads")
        if i.fusion == "concat" and i.out_proj == "separate":
            need(self.d_model % 2 == 0, "d_model", "must be even for separate projections + concat")
        if self.moe is not None:
            need(1 <= self.moe.top_k <= self.moe.n_experts, "moe.top_k", "must be in [1, n_experts]")
            for name in ("n_shared", "bias_update_rate", "aux_loss_coef"):
                v = getattr(self.moe, name)
                need(math.isfinite(v) and v >= 0, f"moe.{name}", f"must be >= 0 (got {v!r})")

    @property
    def d_expert(self) -> int:
        assert self.moe is not None
        return self.moe.d_expert or self.d_ffn // 2

    @property
    def out_init_std(self) -> float:
        """Init std of the projections that write into the residual stream (GPT-2 style)."""
        return self.init_std / math.sqrt(2 * self.n_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        d["intra"] = IntraConfig(**d.get("intra", {}))
        if d.get("moe") is not None:
            d["moe"] = MoEConfig(**d["moe"])
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> ModelConfig:
        """`from_dict` for a checkpoint's model_config.json. model.overrides were untyped before
        2026-12-04, so a checkpoint may hold a bool field as a string ("no") that its model was
        built with as true: such a value is read as the model was built, bool(value), with a warning."""
        d = dict(d)
        d["intra"] = _read_as_built(d.get("intra", {}), IntraConfig, "intra.")
        return cls.from_dict(_read_as_built(d, cls))


def _read_as_built(fields: dict[str, Any], section: type, prefix: str = "") -> dict[str, Any]:
    hints = typing.get_type_hints(section)
    out = dict(fields)
    for name, value in fields.items():
        if hints.get(name) is bool and not isinstance(value, bool):
            out[name] = bool(value)
            log.warning("saved model config: %s%s is %r, not a bool (written before model.overrides were typed); "
                        "read as %s, the value its model was built with", prefix, name, value, out[name])
    return out


def field_type(key: str) -> Any:
    """The type hint of a dotted ModelConfig field ('d_model' -> int, 'rope.factor' -> float | None);
    call after `override_error` found none."""
    head, _, rest = key.partition(".")
    hint = typing.get_type_hints(ModelConfig)[head]
    if not rest:
        return hint
    section = next(t for t in (*typing.get_args(hint), hint) if dataclasses.is_dataclass(t))
    return typing.get_type_hints(section)[rest]


def scalar_type(key: str) -> type | None:
    """bool, int or float for a dotted field of that type (optional or not), else None."""
    hint = field_type(key)
    return next((t for t in (bool, int, float) if t in (hint, *typing.get_args(hint))), None)


def _is_a(value: Any, hint: Any) -> bool:
    """Whether `value` is of a ModelConfig field's type (an int is a float; a bool is neither)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (tuple, list)) and len(value) == len(args) and all(map(_is_a, value, args))
    if args:  # X | None
        return any(_is_a(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def type_problems(obj: Any, prefix: str = "") -> list[str]:
    """'FIELD is VALUE, not a TYPE' for each field of a (nested) config dataclass of the wrong type:
    a string for a float would fail at the first step, "no" for a bool would read as true."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            out += type_problems(value, f"{prefix}{f.name}.")
        elif not _is_a(value, hint):
            out.append(f"{prefix}{f.name} is {value!r}, not {getattr(hint, '__name__', str(hint))}")
    return out


def override_error(key: str, value: Any = None) -> str | None:
    """Why `key` names no ModelConfig field (None when it does): a top-level field ('d_model'), a
    field of a nested section ('intra.fusion'), or a section given as a table of fields. Checked
    where a config file or flag sets the override, so the error can name it."""
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(ModelConfig)
    if head not in hints:
        return f"unknown model field '{key}'"
    section = next((t for t in (*typing.get_args(hints[head]), hints[head]) if dataclasses.is_dataclass(t)), None)
    keys = [rest] if rest else list(value) if isinstance(value, dict) else []
    if keys and section is None:
        return f"model field '{head}' is not a section (set it as model.overrides.{head}=VALUE)"
    if section is not None and not rest and value is not None and not isinstance(value, dict):
        off = "; a model without MoE is the arch without _moe" if head == "moe" else ""
        return f"model field '{head}' is a section: set its fields (model.overrides.{head}.NAME=VALUE){off}"
    names = {f.name for f in dataclasses.fields(section)} if section else set()
    unknown = [k for k in keys if k not in names]
    if unknown:
        return f"unknown model field '{head}.{unknown[0]}' ({head} has: {', '.join(sorted(names))})"
    return None
