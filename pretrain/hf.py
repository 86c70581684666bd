"""Convert checkpoints to and from Hugging Face `transformers` format.

    python -m pretrain.hf export --checkpoint RUN/checkpoints/step_00001000 --out HF_DIR [--tokenizer T]
    python -m pretrain.hf import --hf HF_DIR --out DIR

The export is safetensors, config.json, generation_config.json and the run's tokenizer
(tokenizer.json + tokenizer_config.json), so that `AutoModelForCausalLM.from_pretrained(HF_DIR)` and
`AutoTokenizer.from_pretrained(HF_DIR)` load offline and agree on the BOS/EOS ids. Architectures
without a native transformers class also get their modeling code (configuration_hybrid.py,
modeling_hybrid.py): load those with `trust_remote_code=True`. The tokenizer is the one recorded
for the run's data (checkpoint config.toml -> data.sources -> manifest.json), or `--tokenizer`
('byte', a tokenizer.json or a prepared data dir). The import writes a weights-only checkpoint:
start a run from it with `--checkpoint.init_from=DIR` (fresh optimizer and schedule); an export
with our modeling code is read with this repository's copy of that code (the directory's code is
never run). Every failure is one line on stderr and exit status 2. The architecture mapping itself
lives in the model zoo (`pretrain.model.hf`); this module moves files and tokenizers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.checkpoint import (CONFIG_FILE, MODEL_CONFIG_FILE, commit, load_model_weights, model_config_json,
                                 save_model_weights)
from pretrain.checkpoint_integrity import MARKER

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.tokenizer import Tokenizer
    from pretrain.model import HybridLM, ModelConfig

PROG = "python -m pretrain.hf"
EXIT_USAGE = 2
TOKENIZER_HELP = "'byte', a tokenizer.json or a prepared data dir"


class CliError(Exception):
    """Bad input the user can fix: `main` prints it as one line and exits with status 2."""


def require_transformers() -> None:
    """The export and import need transformers>=5 (its config names: rope_parameters, layer_types)."""
    try:
        import transformers
    except ImportError:
        raise CliError("transformers is not installed; pip install 'hybrid-pretrain[hf]' (transformers>=5)") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise CliError(f"transformers {transformers.__version__} is too old; pip install 'transformers>=5'")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Importing the transformers side (which loads torchao where installed) logs torchao's kernel
    libraries it cannot load and torch's pytree deprecations: noise around a one-line error."""
    before = logging.root.manager.disable
    logging.disable(max(before, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(before)


def read_model_config(checkpoint: Path) -> ModelConfig:
    """The ModelConfig a checkpoint directory's weights belong to."""
    from pretrain.model import ModelConfig

    if not checkpoint.is_dir():
        what = "not a directory" if checkpoint.exists() else "no such directory"
        raise CliError(f"{checkpoint}: {what}; --checkpoint takes RUN_DIR/checkpoints/step_NNNNNNNN")
    cfg_file = checkpoint / MODEL_CONFIG_FILE
    if not cfg_file.is_file():
        steps = sorted([*checkpoint.glob("step_*"), *checkpoint.glob("checkpoints/step_*")])
        hint = f", e.g. {steps[-1]}" if steps else ""
        raise CliError(f"{checkpoint}: not a checkpoint (no {MODEL_CONFIG_FILE}); pass a step_* directory{hint}")
    try:
        return ModelConfig.from_saved(json.loads(cfg_file.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise CliError(f"{cfg_file}: not a model config ({e}); the checkpoint is damaged") from None


def read_run_config(checkpoint: Path) -> dict[str, Any]:
    """The run config saved beside the weights; empty for a weights-only checkpoint (`import` output)."""
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CliError(f"{path}: invalid TOML ({e}); the checkpoint is damaged") from None


def load_model(checkpoint: Path) -> HybridLM:
    """Our model with the weights of `checkpoint` (any number of ranks wrote it)."""
    from pretrain.model.legacy import legacy_splits
    from pretrain.model.lm import HybridLM

    model = HybridLM(read_model_config(checkpoint))
    state = model.state_dict()
    try:
        load_model_weights(checkpoint, state, legacy_splits(model.config))
    except ValueError as e:  # incomplete checkpoint or weights of another model: names the file
        raise CliError(str(e)) from None
    model.load_state_dict(state)
    return model


def run_tokenizer(checkpoint: Path, run_config: dict[str, Any], override: str | None) -> Tokenizer:
    """`override`, else the tokenizer the run's first data source was prepared with (a mixture's
    sources share one: the loader checks that at start)."""
    from data_pipeline.errors import DataInputError
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.config import parse_source

    data = run_config.get("data", {})
    sources = data.get("sources") if isinstance(data, dict) else None
    if sources is not None and not (isinstance(sources, list) and all(isinstance(x, str) for x in sources)):
        raise CliError(f"{checkpoint / CONFIG_FILE}: data.sources = {sources!r} is not a list of directories; the "
                       f"checkpoint is damaged, or pass --tokenizer ({TOKENIZER_HELP})")
    if override is not None:
        recorded = recorded_tokenizer(parse_source(sources[0])[0]) if sources else None
        try:
            tok = load_tokenizer(override, recorded=recorded)
        except DataInputError as e:  # names the file, the field and the fix
            raise CliError(f"--tokenizer {e}") from None
        if recorded is not None and (recorded.kind, recorded.sha256) != (tok.identity.kind, tok.identity.sha256):
            raise CliError(f"--tokenizer {override}: not the tokenizer the run's data was prepared with "
                           f"({sources[0]}: {recorded.kind} tokenizer, {recorded.vocab_size} ids); drop --tokenizer "
                           "or pass that one")
        return tok
    where = checkpoint / CONFIG_FILE
    if not sources:
        raise CliError(f"{where}: missing or no data.sources, so the run's tokenizer is unknown; "
                       f"pass --tokenizer ({TOKENIZER_HELP})")
    source = parse_source(sources[0])[0]
    try:
        return load_tokenizer(source)
    except DataInputError as e:
        raise CliError(f"{where}: data.sources[0] {source!r}: the run's tokenizer is unreadable ({e.path}: "
                       f"{e.problem}); run from the directory the training was launched from (a relative source "
                       f"is read from there), or pass --tokenizer ({TOKENIZER_HELP})"
                       ) from None


def recorded_tokenizer(source: str):
    """The tokenizer identity a prepared data dir's manifest records, None where it cannot be read."""
    from data_pipeline.errors import DataInputError
    from data_pipeline.manifest import read_manifest

    try:
        return read_manifest(Path(source)).tokenizer
    except (DataInputError, OSError, ValueError):
        return None


def hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer encoding text as prepare did, with BOS prepended (the loader starts
    every training document with BOS) and special tokens never matched in text (text that spells
    one is text, as `JsonTokenizer.encode`). The byte tokenizer has no tokenizer.json: it becomes an
    equivalent one (a BPE of the 256 byte tokens, no merges, byte fallback) with BOS/EOS after them."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.tokenizer import ByteTokenizer

    is_bytes = isinstance(tok, ByteTokenizer)
    if is_bytes:
        backend = Backend(models.BPE(vocab={f"<0x{b:02X}>": b for b in range(256)}, merges=[], byte_fallback=True))
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        backend.add_special_tokens([AddedToken("<|bos|>", special=True), AddedToken("<|eos|>", special=True)])
    else:
        backend = Backend.from_file(str(tok.path))
    bos, eos = backend.id_to_token(tok.bos_id), backend.id_to_token(tok.eos_id)
    # No pad token of our own: EOS pads (padded positions are masked, so which id does not matter).
    # Padding goes on the left: a batch of prompts is continued from each one's last token.
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos,
                                   add_bos_token=True, split_special_tokens=True, padding_side="left")


def require_new(out: Path) -> None:
    """`out` is free and not inside a checkpoint (checkpoint.keep would delete it with that step)."""
    if out.exists():
        raise CliError(f"{out}: already exists; choose a new --out directory")
    inside = next((d for d in out.resolve().parents if (d / MARKER).is_file()), None)
    if inside is not None:
        raise CliError(f"--out {out}: inside checkpoint {inside}, which checkpoint.keep deletes with its step; "
                       "choose a directory outside the run's checkpoints")


@contextlib.contextmanager
def new_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` (this process's own) to fill; it becomes `out` only when the
    body publishes it (`publish`), and is removed when the body fails."""
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise CliError(f"--out {out}: cannot create it ({e.strerror}); choose a writable directory") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Failures of the writes into `out`'s temporary directory as one line: safetensors and
    tokenizers raise their own exception types for a full disk."""
    try:
        yield
    except Exception as e:
        raise CliError(f"--out {out}: writing failed ({type(e).__name__}: {e}); nothing was left behind, free "
                       "space or choose another --out") from None


def publish(tmp: Path, out: Path, seal: bool = False) -> None:
    """Rename the finished `tmp` to `out` (sealed as a checkpoint with `seal`), unless `out`
    appeared meanwhile (another export or import into it): never replace what someone wrote."""
    if out.exists():
        raise CliError(f"{out}: appeared while this ran (another export or import?); choose a new --out directory")
    if seal:
        commit(tmp, out)
    else:
        tmp.rename(out)


def readable_by_all(directory: Path) -> None:
    """safetensors writes its file 0600; the export's files get the umask's mode like the others
    (a shared filesystem's readers)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def export(checkpoint: Path, out: Path, tokenizer: str | None = None) -> tuple[Tokenizer, str]:
    """Write the HF model and tokenizer of `checkpoint` to `out`; returns the tokenizer used and the
    transformers class name (HybridForCausalLM: our modeling code is written beside the weights).
    Everything that can be refused is checked before the weights are read."""
    cfg, run_config = read_model_config(checkpoint), read_run_config(checkpoint)
    tok = run_tokenizer(checkpoint, run_config, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise CliError(f"{checkpoint / MODEL_CONFIG_FILE}: vocab_size={cfg.vocab_size} but the tokenizer has "
                       f"{tok.vocab_size} ids; pass the run's own tokenizer to --tokenizer")
    require_new(out)
    with new_dir(out) as tmp:
        with quiet_imports():
            from pretrain.model.hf import to_hf  # imports transformers and torchao (seconds)

        hf = to_hf(load_model(checkpoint).eval())
        for config in (hf.config, hf.generation_config):
            config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_id, tok.eos_id, tok.eos_id
        with writing(out):
            hf.save_pretrained(tmp)
            hf_tokenizer(tok).save_pretrained(tmp)
            readable_by_all(tmp)
        publish(tmp, out)
    return tok, type(hf).__name__


def import_(hf_dir: Path, out: Path) -> Path:
    with quiet_imports():
        from transformers import AutoModelForCausalLM

        from pretrain.hf_remote.configuration_hybrid import MODEL_TYPE
        from pretrain.hf_remote.modeling_hybrid import HybridForCausalLM
        from pretrain.model.hf import from_hf

    config = hf_dir / "config.json"
    if not config.is_file():
        raise CliError(f"{hf_dir}: no config.json; --hf takes a directory written by save_pretrained")
    try:
        ours = json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (ValueError, AttributeError) as e:
        raise CliError(f"{config}: not a JSON object ({e})") from None
    require_new(out)
    loader = HybridForCausalLM if ours else AutoModelForCausalLM  # our export: our own copy of its code
    try:
        model = from_hf(loader.from_pretrained(hf_dir, local_files_only=True))
    except (OSError, ValueError) as e:  # unreadable files, or an architecture we cannot express
        raise CliError(f"{hf_dir}: {e}") from None
    with new_dir(out) as tmp:
        with writing(out):
            save_model_weights(tmp, model.state_dict())
            (tmp / MODEL_CONFIG_FILE).write_text(model_config_json(model.config))
        publish(tmp, out, seal=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="checkpoint -> Hugging Face directory (model + tokenizer)")
    e.add_argument("--checkpoint", type=Path, required=True, help="RUN_DIR/checkpoints/step_NNNNNNNN")
    e.add_argument("--out", type=Path, required=True, help="new directory")
    e.add_argument("--tokenizer", help=f"{TOKENIZER_HELP}; default: the one the run's data was prepared with")
    i = sub.add_parser("import", help="Hugging Face directory -> weights-only checkpoint")
    i.add_argument("--hf", type=Path, required=True)
    i.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        require_transformers()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if args.cmd == "export":
            tok, model_class = export(args.checkpoint, args.out, args.tokenizer)
            remote = model_class == "HybridForCausalLM"
            code = " with its modeling code: load with trust_remote_code=True" if remote else ""
            print(f"exported to {args.out} ({model_class}{code}; {tok.identity.kind} tokenizer: vocab "
                  f"{tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id})")
        else:
            out = import_(args.hf, args.out)
            print(f"imported to {out}; train from it with --checkpoint.init_from={out} "
                  f"(model settings must match {out / MODEL_CONFIG_FILE})")
    except (CliError, OSError) as err:  # OSError: a file we could not write or read, named in its text
        print(f"{PROG} {args.cmd}: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
