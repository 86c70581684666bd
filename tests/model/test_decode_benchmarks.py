"""The decode and peer benchmarks' CPU smoke modes (tiny models): every row measured or said
unavailable, the JSON and the T13-style PNG written."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "evaluation"))
from image_checks import assert_nonempty_png  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inference_benchmark_tiny_cpu(tmp_path, capsys):
    """The documented CPU command (docs/benchmarks.md), every row."""
    load("inference").main(["--device", "cpu", "--preset", "tiny", "--prompt", "8", "--lengths", "24,40",
                            "--warmup", "1", "--steps", "2", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "inference.json").read_text())
    assert [row["model"] for row in r["rows"]] == ["llama", "swa", "mamba2", "inter_hybrid", "intra_hybrid",
                                                   "transformers_llama"]
    for row in r["rows"]:
        assert "error" not in row, row
        assert [p["total"] for p in row["points"]] == [24, 40]
        for p in row["points"]:
            assert p["tokens_per_s"] > 0 and 0 < p["bound_fraction"] and p["cache_bytes"] > 0
    llama, swa = r["rows"][0]["points"], r["rows"][1]["points"]
    assert llama[1]["cache_bytes"] > llama[0]["cache_bytes"]  # global KV grows with the context
    assert r["rows"][5]["points"][0]["cache_bytes"] == llama[0]["cache_bytes"]  # same layout, fp32
    assert r["rows"][2]["points"][0]["cache_bytes"] == r["rows"][2]["points"][1]["cache_bytes"]  # Mamba2: fixed
    assert swa[1]["cache_bytes"] < llama[1]["cache_bytes"]  # 2 of 4 tiny SWA layers keep window + sinks
    assert_nonempty_png(tmp_path / "inference.png")
    assert "transformers_llama" in capsys.readouterr().out


def test_inference_benchmark_profiles_at_the_longest_length(tmp_path, capsys):
    """`--profile` with the fewest steps the cache makes room for (warmup 1, steps 1): both profiler
    passes rewind to the longest length, so neither runs out of cache."""
    load("inference").main(["--device", "cpu", "--preset", "tiny", "--prompt", "8", "--lengths", "24,40",
                            "--warmup", "1", "--steps", "1", "--archs", "llama", "--profile", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "inference.json").read_text())["rows"][0]
    assert row["model"] == "llama" and row["profile_at"] == 40 and "error" not in row
    assert row["kernels_per_step"] > 0 and row["profile"] and any(o["op"] == "aten::mm" for o in row["ops"])
    assert "llama at 40: " in capsys.readouterr().out


@pytest.mark.slow  # compiles a tiny llama block and the compiled attention
def test_inference_benchmark_variants_side_by_side(tmp_path, capsys):
    """The eager step and the compiled step with either attention read of one model, one row each,
    and their ratios to the eager row closing the table."""
    load("inference").main(["--device", "cpu", "--preset", "tiny", "--prompt", "8", "--lengths", "24,40",
                            "--warmup", "1", "--steps", "2", "--archs", "llama", "--no-hf",
                            "--variants", "eager,compiled,compiled-attn", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "inference.json").read_text())
    assert [(row["model"], row["variant"]) for row in r["rows"]] == [
        ("llama", "eager"), ("llama compiled", "compiled"), ("llama compiled-attn", "compiled-attn")]
    for row in r["rows"]:
        assert "error" not in row and [p["total"] for p in row["points"]] == [24, 40], row
    assert [row["attention_kernel"] for row in r["rows"]] == ["split_k", "split_k", "compiled"]  # CPU: no Triton read
    out = capsys.readouterr().out
    for variant in ("compiled", "compiled-attn"):
        assert f"llama {variant} / llama tokens/s at 24, 40:" in out


def test_inference_variants_without_attention():
    """A model without attention runs no variant that only changes the attention read."""
    from pretrain.model import build_model

    variants = load("inference").variants_for
    assert variants(build_model("mamba2", "tiny"), ["eager", "compiled", "compiled-split-k", "compiled-attn"]) == [
        "eager", "compiled"]
    assert variants(build_model("swa", "tiny"), ["compiled-attn"]) == ["compiled-attn"]


def test_decode_weight_bytes_count_what_a_step_reads():
    """The memory bound's weights: every parameter once, but of each MoE layer's routed experts only
    batch x top_k (all 8 were counted: hybrid_moe 1B's bound 1.6x too slow at batch 4), and of an
    untied input embedding the batch's rows."""
    from pretrain.model import build_model

    weight_bytes = load("inference").weight_bytes
    moe = build_model("hybrid_moe", "tiny", moe={"n_experts": 8, "top_k": 1})
    every = sum(p.numel() * 4 for p in moe.parameters())
    layers = [m.experts for m in moe.modules() if type(m).__name__ == "MoE"]
    per_expert = 4 * sum(w[0].numel() for w in (layers[0].w1, layers[0].w2, layers[0].w3))
    assert weight_bytes(moe, 3) == every - len(layers) * 5 * per_expert  # 3 of 8 experts per layer
    assert weight_bytes(moe, 8) == weight_bytes(moe, 64) == every
    untied = build_model("llama", "tiny", tie_embeddings=False)
    rows = untied.config.vocab_size - 2
    assert weight_bytes(untied, 2) == sum(p.numel() * 4 for p in untied.parameters()) - rows * untied.config.d_model * 4


@pytest.mark.parametrize("args, message", [
    (["--lengths", "24,abc"], "argument --lengths: takes integers >= 1"),
    (["--dtype", "foo"], "argument --dtype: invalid choice"),
    (["--batch", "0"], "--batch and --prompt must be >= 1"),
    (["--bandwidth", "0"], "--bandwidth > 0"),
])
def test_inference_benchmark_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        load("inference").main(["--device", "cpu", "--preset", "tiny", "--out", str(tmp_path), *args])
    assert message in str(exit_.value.code) + capsys.readouterr().err


def test_inference_benchmark_rejects_close_lengths(tmp_path):
    with pytest.raises(SystemExit, match="--lengths must exceed"):
        load("inference").main(["--device", "cpu", "--preset", "tiny", "--prompt", "8", "--lengths", "12",
                                "--out", str(tmp_path)])


def test_peers_benchmark_tiny_cpu(tmp_path):
    """The documented CPU command (docs/benchmarks.md)."""
    load("peers").main(["--device", "cpu", "--preset", "tiny", "--seq", "32", "--warmup", "1", "--iters", "1",
                        "--variants", "eager,copies", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "peers.json").read_text())
    for name in ("llama eager", "llama copies", "transformers_llama", "mamba2 eager"):
        assert r["rows"][name]["tokens_per_s"] > 0
    assert r["rows"]["llama eager"]["params"] == r["rows"]["transformers_llama"]["params"]  # same dims
    mamba_ssm_installed = importlib.util.find_spec("mamba_ssm") is not None
    assert ("error" in r["rows"]["mamba_ssm_mamba2"]) != mamba_ssm_installed
    mamba_ratios = {f"mamba2 {v} / mamba_ssm_mamba2" for v in ("eager", "copies")} if mamba_ssm_installed else set()
    assert set(r["ratios"]) == {f"llama {v} / transformers_llama" for v in ("eager", "copies")} | mamba_ratios


def test_peers_benchmark_profiles_each_row(tmp_path, capsys):
    """`--profile`: each row says where its step time goes (ops per step on the CPU, the top ones, the
    top ops by input shape), printed before the table."""
    load("peers").main(["--device", "cpu", "--preset", "tiny", "--seq", "32", "--warmup", "1", "--iters", "1",
                        "--archs", "llama", "--variants", "eager", "--profile", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "peers.json").read_text())["rows"]
    for name in ("llama eager", "transformers_llama"):
        top = rows[name]["profile"]
        assert rows[name]["kernels_per_step"] > 0 and 0 < len(top) <= 6
        assert all(0 < k["share"] <= 1 and k["us_per_step"] > 0 for k in top)
        assert [k["share"] for k in top] == sorted((k["share"] for k in top), reverse=True)
        assert abs(sum(rows[name]["kinds"].values()) - 1) < 1e-6 and rows[name]["kinds"]["gemm"] > 0
        ops = rows[name]["ops"]  # which op and shape: the linear layers' GEMMs take the most time on the CPU
        assert 0 < len(ops) <= 12 and all(o["op"].startswith("aten::") and o["calls_per_step"] > 0 for o in ops)
        assert [o["us_per_step"] for o in ops] == sorted((o["us_per_step"] for o in ops), reverse=True)
        assert any(o["op"] in ("aten::mm", "aten::addmm", "aten::bmm") and "[" in o["shapes"] for o in ops)
    out = capsys.readouterr().out
    assert out.index("llama eager: ") < out.index("    op ") < out.index("model ")  # the profiles, then the table


def test_compile_fp8_benchmark_profiles_on_cpu(tmp_path, capsys):
    """The documented CPU smoke run of compile_fp8.py (docs in its module): a row with its MFU and,
    with --profile, where the step goes, printed before the table."""
    out = tmp_path / "compile_fp8.json"
    load("compile_fp8").main(["--device", "cpu", "--preset", "tiny", "--seq", "32", "--archs", "llama",
                              "--variants", "eager", "--profile", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and len(r["rows"]) == 1
    row = r["rows"][0]
    assert row["variant"] == "eager" and row["tokens_per_s"] > 0 and row["mfu"] > 0
    assert row["profile"] and any(o["op"] == "aten::mm" for o in row["ops"])
    printed = capsys.readouterr().out
    assert printed.index("llama eager: ") < printed.index("    op ") < printed.index("arch ")


def test_compile_fp8_checks_every_variant_first_and_a_failing_row_leaves_the_rest(tmp_path):
    """An unknown FP8 recipe is refused before any row runs (any fp8-<name> passed, then failed in
    torchao after the rows before it); a row that fails records its error and the next one runs."""
    out = tmp_path / "compile_fp8.json"
    with pytest.raises(SystemExit, match="--variants: fp8-bogus: .*fp8-rowwise / fp8-tensorwise"):
        load("compile_fp8").main(["--device", "cpu", "--preset", "tiny", "--seq", "32", "--archs", "llama",
                                  "--variants", "eager,fp8-bogus", "--out", str(out)])
    assert not out.exists()
    gpu_model, rows = load("gpu_model"), []

    def failing() -> dict:
        raise RuntimeError("Inductor: stride mismatch\nmore lines")

    gpu_model.record_row(rows, str(out), "llama", failing, variant="compile")
    gpu_model.record_row(rows, str(out), "llama", lambda: {"arch": "llama", "tokens_per_s": 1.0}, variant="eager")
    assert json.loads(out.read_text())["rows"] == [
        {"arch": "llama", "error": "RuntimeError: Inductor: stride mismatch", "variant": "compile"},
        {"arch": "llama", "tokens_per_s": 1.0, "variant": "eager"}]


def test_profile_kinds_name_the_optimizer_before_copies():
    """Kernel names hold their ops' words: the AdamW-with-copy kernel is the optimizer, an Inductor
    kernel fusing a cast is fused code, only plain copy kernels count as copies."""
    kind = load("gpu_model").kernel_kind
    assert kind("adamw_with_copy") == "optimizer"
    assert kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata") \
        == "optimizer"
    assert kind("triton_poi_fused__to_copy_add_cat_div_expand_mul_pow_silu_15") == "fused (inductor)"
    assert kind("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda") == "copy / cast / cat"


def test_train_step_refuses_an_unknown_precision():
    """A misspelt precision would otherwise time an fp32 step (neither autocast nor bf16 parameters)."""
    with pytest.raises(ValueError, match="precision 'copy'"):
        load("gpu_model").time_train_step(torch.nn.Linear(2, 2), lambda a, b: a.sum(), 8, device="cpu",
                                          precision="copy")
