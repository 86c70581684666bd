"""Configuration of a hybrid Transformer / Mamba2 (/ MoE) language model exported by the `pretrain`
stack. It carries the training stack's model config fields as they are (sizes, the expanded layer
types, and the `rope`, `intra` and `moe` sub-dicts), plus the standard transformers names."""

from __future__ import annotations

from transformers import PretrainedConfig

MODEL_TYPE = "pretrain_hybrid"


class HybridConfig(PretrainedConfig):
    """`blocks`: one symbol per block, 'A' global attention, 'S' sliding-window attention with
    sinks, 'M' Mamba2, 'H' intra-layer hybrid (attention and Mamba2 side by side). `moe` None: a
    dense SwiGLU FFN in every block, else shared + routed experts in every block."""

    model_type = MODEL_TYPE

    def __init__(self, blocks: list[str] | None = None, pattern: str = "A", vocab_size: int = 512,
                 d_model: int = 64, d_ffn: int = 192, norm_eps: float = 1e-5, tie_embeddings: bool = True,
                 init_std: float = 0.02, max_seq_len: int = 256, n_heads: int = 4, n_kv_heads: int = 2,
                 head_dim: int = 16, rope: dict | None = None, window: int = 512, n_sink: int = 64,
                 swa_rope_theta: float = 10000.0, d_ssm: int = 128, ssm_head_dim: int = 32, d_state: int = 16,
                 n_groups: int = 1, d_conv: int = 4, chunk_size: int = 16,
                 a_init_range: tuple[float, float] | list[float] = (0.01, 2.0), dt_min: float = 0.001,
                 dt_max: float = 0.1, intra: dict | None = None, moe: dict | None = None, **kwargs):
        self.blocks = list(blocks or ["A"])
        self.pattern, self.vocab_size, self.d_model, self.d_ffn = pattern, vocab_size, d_model, d_ffn
        self.norm_eps, self.tie_embeddings, self.init_std = norm_eps, tie_embeddings, init_std
        self.max_seq_len = max_seq_len
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope = dict(rope or {"theta": 500000.0, "factor": None})
        self.window, self.n_sink, self.swa_rope_theta = window, n_sink, swa_rope_theta
        self.d_ssm, self.ssm_head_dim, self.d_state, self.n_groups = d_ssm, ssm_head_dim, d_state, n_groups
        self.d_conv, self.chunk_size = d_conv, chunk_size
        self.a_init_range, self.dt_min, self.dt_max = list(a_init_range), dt_min, dt_max
        self.intra = dict(intra) if intra is not None else None
        self.moe = dict(moe) if moe is not None else None
        # standard names read by transformers utilities (generation, device maps, pipelines)
        self.hidden_size, self.num_hidden_layers, self.max_position_embeddings = d_model, len(self.blocks), max_seq_len
        self.num_attention_heads, self.num_key_value_heads = n_heads, n_kv_heads
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(tie_word_embeddings=tie_embeddings, **kwargs)
