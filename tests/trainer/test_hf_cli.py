"""`python -m pretrain.hf export/import`: a trained checkpoint leaves and re-enters through transformers
with its tokenizer, and every refusal or failure is one line on stderr with exit status 2."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from pretrain.hf import load_model, main
from pretrain.trainer import Trainer
from trainer_helpers import tiny_config, weights

# Loads an export where this project cannot be imported, as on a machine with transformers + torch only.
STANDALONE = """
import sys
import torch
for name in ("pretrain", "parallel", "data_pipeline"):
    sys.modules[name] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
hf_dir, result = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, local_files_only=True).eval()
ids = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)("def f(x):", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
torch.save({"ids": ids, "logits": logits, "generated": generated}, result)
"""

TEXT = "def f(x):\n    return 'é' + x  # <|eos|> <|bos|>"


def train(tmp_path_factory, corpus: Path, arch: str) -> Path:
    run_dir = tmp_path_factory.mktemp(arch)
    Trainer(tiny_config(run_dir, corpus, 2, "--arch", arch)).train()
    return run_dir / "checkpoints" / "step_00000002"


@pytest.fixture(scope="module")
def llama_checkpoint(corpus, tmp_path_factory):
    return train(tmp_path_factory, corpus, "llama")


@pytest.fixture(scope="module")
def hybrid_moe_checkpoint(corpus, tmp_path_factory):
    return train(tmp_path_factory, corpus, "hybrid_moe")


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json (the demo's kind: <|bos|> 0, <|eos|> 1, <|pad|> 2), 300 ids."""
    from data_pipeline.demo_corpus import stdlib_sources, train_bpe

    return train_bpe(stdlib_sources(100_000), 300, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def export(checkpoint: Path, out: Path, *extra: str) -> int:
    return main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *extra])


def error_line(capsys) -> str:
    """The one stderr line of a failed command (no traceback, no usage text)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m pretrain.hf "), err
    return err


def test_export_loads_offline_in_transformers_with_identical_logits(llama_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert export(llama_checkpoint, out) == 0
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ours = load_model(llama_checkpoint).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits.float() - ours(tokens)).abs().max().item()
    assert diff < 1e-4


def assert_special_ids(out: Path, bos: int, eos: int) -> None:
    for name in ("config.json", "generation_config.json"):
        config = json.loads((out / name).read_text())
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (bos, eos, eos), name


def test_export_writes_the_runs_byte_tokenizer_and_its_ids(llama_checkpoint, tmp_path):
    """The run trained on byte-tokenized data (BOS 256, EOS 257, no tokenizer.json): the export finds
    that in the data's manifest and writes an equivalent tokenizer.json that prepends BOS like the loader."""
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import ByteTokenizer

    out = tmp_path / "hf"
    assert export(llama_checkpoint, out) == 0
    byte = ByteTokenizer()
    assert_special_ids(out, byte.bos_id, byte.eos_id)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok(TEXT).input_ids
    assert ids == [byte.bos_id, *byte.encode(TEXT)]
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (byte.bos_id, byte.eos_id, byte.eos_id)


def test_batched_generation_with_the_exported_tokenizer_is_each_prompts_own(llama_checkpoint, tmp_path):
    """Prompts of different lengths padded together continue as each alone (right padding, the
    tokenizer's default, continued the short prompt from its padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert export(llama_checkpoint, out) == 0
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():  # weights whose choices depend on the context (2 steps of training barely do)
        for i, p in enumerate(hf.parameters()):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    prompts, greedy = ["hi", "def main(x):"], {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    batch = tok(prompts, return_tensors="pt", padding=True)
    together = hf.generate(**batch, **greedy)[:, -5:]
    for row, prompt in zip(together, prompts):
        assert torch.equal(row, hf.generate(**tok(prompt, return_tensors="pt"), **greedy)[0, -5:]), prompt


def test_export_with_a_tokenizer_json(bpe_tokenizer, tmp_path):
    """A weights-only checkpoint (`import` output) has no run config: the export asks for --tokenizer,
    then ships that tokenizer.json with its own BOS/EOS ids."""
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import JsonTokenizer
    from pretrain.model import build_model
    from pretrain.model.hf import to_hf

    to_hf(build_model("llama", "tiny", vocab_size=300)).save_pretrained(tmp_path / "src")
    assert main(["import", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 0
    assert export(tmp_path / "ckpt", tmp_path / "hf") == 2
    assert export(tmp_path / "ckpt", tmp_path / "hf", "--tokenizer", str(bpe_tokenizer)) == 0
    ours = JsonTokenizer(bpe_tokenizer)
    assert (ours.bos_id, ours.eos_id) == (0, 1)
    assert_special_ids(tmp_path / "hf", ours.bos_id, ours.eos_id)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = tok(TEXT).input_ids
    assert ids == [ours.bos_id, *ours.encode(TEXT)]
    assert tok.decode(ids[1:]) == ours.decode(ids[1:])


def test_export_of_hybrid_moe_runs_without_this_project(hybrid_moe_checkpoint, tmp_path, capsys):
    """The README trains hybrid_moe (intra-hybrid + MoE), which transformers has no class for: the export
    ships its modeling code, and a Python that cannot import this project loads it, computes our logits
    and generates our tokens greedily; `import` takes it back to the same weights."""
    checkpoint, out = hybrid_moe_checkpoint, tmp_path / "hf"
    capsys.readouterr()
    assert export(checkpoint, out) == 0
    assert "(HybridForCausalLM with its modeling code: load with trust_remote_code=True;" in capsys.readouterr().out
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_hybrid.HybridForCausalLM"
    assert (out / "modeling_hybrid.py").is_file() and (out / "configuration_hybrid.py").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", STANDALONE, str(out), str(tmp_path / "result.pt")], cwd=tmp_path, env=env,
                   check=True, timeout=300)
    result = torch.load(tmp_path / "result.pt")
    ours = load_model(checkpoint).eval()
    with torch.no_grad():
        logits = ours(result["ids"])
    assert ((result["logits"] - logits).abs().max() / logits.abs().max()).item() < 1e-4
    assert torch.equal(result["generated"], ours.generate(result["ids"], 8))
    assert main(["import", "--hf", str(out), "--out", str(tmp_path / "imported")]) == 0
    a, b = weights(checkpoint), weights(tmp_path / "imported")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_documented_hf_commands_run(hybrid_moe_checkpoint, corpus, tmp_path, monkeypatch):
    """Every `python -m pretrain.hf` command of README.md and docs/*.md runs as written, in document
    order (imports read the earlier exports), with --checkpoint pointed at a trained tiny checkpoint and
    a --tokenizer data directory at the test corpus."""
    from test_documented_commands import DOCS, shell_lines

    commands = [line.split()[3:] for doc in DOCS for line in shell_lines(doc)
                if line.startswith("python -m pretrain.hf ")]
    assert {c[0] for c in commands} == {"export", "import"}
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        for flag, value in (("--checkpoint", hybrid_moe_checkpoint), ("--tokenizer", corpus)):
            if flag in argv:
                argv[argv.index(flag) + 1] = str(value)
        assert main(argv) == 0, argv


def damaged_copy(checkpoint: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "damaged" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    damage(copy)
    return copy


def truncate_weights(path: Path) -> None:
    for f in path.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])


def move_data(corpus: Path):
    def damage(path: Path) -> None:
        config = path / "config.toml"
        config.write_text(config.read_text().replace(str(corpus), "/moved/corpus"))
    return damage


@pytest.mark.parametrize("case, expected", [
    ("missing_dir", "no such directory"),
    ("run_dir", r"not a checkpoint .*pass a step_\* directory, e.g. .*step_00000002"),
    ("checkpoint_is_a_file", r"model_config.json: not a directory; --checkpoint takes"),
    ("incomplete", r"not a complete, intact checkpoint \(.*\); pass another step_\* directory"),
    ("out_exists", "already exists"),
    ("out_in_checkpoint", r"--out .*step_00000002/hf: inside checkpoint .*step_00000002, which checkpoint.keep "
                          "deletes with its step"),
    ("out_under_a_file", r"--out .*file/sub: cannot create it \(Not a directory\); choose a writable directory"),
    ("disk_full", r"--out .*out: writing failed \(Exception: No space left on device\); nothing was left behind"),
    ("sources_not_a_list", r"config.toml: data.sources = 'x' is not a list of directories"),
    ("no_transformers", r"transformers is not installed; pip install"),
    ("data_moved", r"config.toml: data.sources\[0\] '/moved/corpus': .*no such file.*pass --tokenizer"),
    ("bad_tokenizer", "--tokenizer /no/tokenizer.json: tokenizer: no such file"),
    ("tokenizer_too_big", "vocab_size=258 but the tokenizer has 300 ids"),
    ("tokenizer_not_the_runs", r"--tokenizer .*tokenizer.json: not the tokenizer the run's data was prepared with "
                               r"\(.*: byte tokenizer, 258 ids\)"),
    ("import_not_hf", "no config.json"),
    ("import_bad_json", r"config.json: not a JSON object"),
    ("import_gpt2", "from_hf supports LlamaForCausalLM, GraniteMoeHybridForCausalLM and our exported "
                    "HybridForCausalLM, not GPT2LMHeadModel"),
])
def test_failures_are_one_line_with_status_2(case, expected, llama_checkpoint, corpus, bpe_tokenizer, tmp_path,
                                             monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(llama_checkpoint), "--out", str(out)]
    if case == "missing_dir":
        argv[2] = str(tmp_path / "nope")
    elif case == "run_dir":
        argv[2] = str(llama_checkpoint.parents[1])
    elif case == "checkpoint_is_a_file":
        argv[2] = str(llama_checkpoint / "model_config.json")
    elif case == "out_in_checkpoint":
        argv[4] = str(llama_checkpoint / "hf")
    elif case == "out_under_a_file":
        (tmp_path / "file").write_text("")
        argv[4] = str(tmp_path / "file" / "sub")
    elif case == "disk_full":  # safetensors and tokenizers raise their own exception types for ENOSPC
        class FullDisk:
            def save_pretrained(self, directory):
                (Path(directory) / "tokenizer.json").write_text("{")
                raise Exception("No space left on device")
        monkeypatch.setattr("pretrain.hf.hf_tokenizer", lambda tok: FullDisk())
    elif case == "sources_not_a_list":
        def damage(path: Path) -> None:
            config = path / "config.toml"
            config.write_text(re.sub(r"sources = \[[^\]]*\]", 'sources = "x"', config.read_text()))
        argv[2] = str(damaged_copy(llama_checkpoint, tmp_path, damage))
    elif case == "incomplete":
        argv[2] = str(damaged_copy(llama_checkpoint, tmp_path, truncate_weights))
    elif case == "out_exists":
        out.mkdir()
    elif case == "no_transformers":
        monkeypatch.setitem(sys.modules, "transformers", None)
    elif case == "data_moved":
        argv[2] = str(damaged_copy(llama_checkpoint, tmp_path, move_data(corpus)))
    elif case == "bad_tokenizer":
        argv += ["--tokenizer", "/no/tokenizer.json"]
    elif case == "tokenizer_too_big":  # the run's data moved: its tokenizer cannot be compared
        argv[2] = str(damaged_copy(llama_checkpoint, tmp_path, move_data(corpus)))
        argv += ["--tokenizer", str(bpe_tokenizer)]
    elif case == "tokenizer_not_the_runs":
        argv += ["--tokenizer", str(bpe_tokenizer)]
    elif case == "import_not_hf":
        argv = ["import", "--hf", str(llama_checkpoint), "--out", str(out)]
    elif case == "import_bad_json":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text("[1, 2]")
        argv = ["import", "--hf", str(tmp_path / "bad"), "--out", str(out)]
    elif case == "import_gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)).save_pretrained(tmp_path / "gpt2")
        argv = ["import", "--hf", str(tmp_path / "gpt2"), "--out", str(out)]
    existed = out.exists()
    assert main(argv) == 2
    err = error_line(capsys)
    assert re.search(expected, err), err
    assert out.exists() == existed and not list(tmp_path.glob(".tmp-*")) and not (llama_checkpoint / "hf").exists()


def test_export_leaves_other_temp_dirs_alone_and_its_files_readable(llama_checkpoint, tmp_path):
    """Another export's (or anyone's) `.tmp-NAME` beside --out is not this export's to delete; the
    weights get the umask's mode like every other file (safetensors writes 0600)."""
    (tmp_path / ".tmp-hf").mkdir()
    (tmp_path / ".tmp-hf" / "notes.txt").write_text("mine")
    assert export(llama_checkpoint, tmp_path / "hf") == 0
    assert (tmp_path / ".tmp-hf" / "notes.txt").read_text() == "mine"
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "hf").iterdir()} == \
           {f.name: 0o666 & ~umask for f in (tmp_path / "hf").iterdir()}


def test_import_round_trip_and_init_from(llama_checkpoint, corpus, tmp_path):
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported"
    assert export(llama_checkpoint, hf_dir) == 0
    assert main(["import", "--hf", str(hf_dir), "--out", str(imported)]) == 0
    a, b = weights(llama_checkpoint), weights(imported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trainer = Trainer(tiny_config(tmp_path / "run", corpus, 1, "--arch", "llama",
                                  f"--checkpoint.init_from={imported}", "--checkpoint.every=0"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume()
    started = trainer.model.state_dict()
    assert all(torch.equal(started[k], a[k]) for k in a) and not all(torch.equal(before[k], a[k]) for k in a)


def test_init_from_a_different_model_names_the_tensors(llama_checkpoint, corpus, tmp_path):
    from pretrain.config import ConfigError

    trainer = Trainer(tiny_config(tmp_path, corpus, 1, "--arch", "mamba2",
                                  f"--checkpoint.init_from={llama_checkpoint}"))
    with pytest.raises(ConfigError, match="init_from.*do not fit.*blocks"):
        trainer.resume()


def test_an_out_that_appears_during_the_export_is_left_alone(llama_checkpoint, tmp_path, monkeypatch, capsys):
    """Another export into the same --out finished first: this one must not replace it."""
    from pretrain import hf

    out = tmp_path / "hf"
    real = hf.hf_tokenizer

    def tokenizer_then_rival(tok):
        out.mkdir()
        (out / "theirs.txt").write_text("the other export's")
        return real(tok)
    monkeypatch.setattr(hf, "hf_tokenizer", tokenizer_then_rival)
    assert export(llama_checkpoint, out) == 2
    assert "hf: appeared while this ran" in error_line(capsys)
    assert [f.name for f in out.iterdir()] == ["theirs.txt"] and not list(tmp_path.glob(".tmp-*"))


def test_init_from_a_deeper_model_is_refused_unless_partial(llama_checkpoint, corpus, tmp_path, caplog):
    """The checkpoint's last blocks have no place in a 2-block model: they were dropped in silence.
    Refused, naming them and the opt-in; with it, the first blocks load and the changed settings
    are listed."""
    from pretrain.config import ConfigError

    shallow = ("--arch", "llama", "--model.overrides.pattern=AA")
    trainer = Trainer(tiny_config(tmp_path / "a", corpus, 1, *shallow, f"--checkpoint.init_from={llama_checkpoint}"))
    with pytest.raises(ConfigError, match=r"init_from: .*do not fit .*blocks\.2\.\S+ has no place here.*"
                                          r"checkpoint.init_from_partial=true"):
        trainer.resume()
    trainer = Trainer(tiny_config(tmp_path / "b", corpus, 1, *shallow, f"--checkpoint.init_from={llama_checkpoint}",
                                  "--checkpoint.init_from_partial=true"))
    with caplog.at_level("WARNING"):
        trainer.resume()
    saved, started = weights(llama_checkpoint), trainer.model.state_dict()
    assert started.keys() < saved.keys() and all(torch.equal(started[k], saved[k]) for k in started)
    assert any("model settings other than those of" in r.getMessage() and "pattern" in r.getMessage()
               for r in caplog.records)
