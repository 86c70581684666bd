"""lm-evaluation-harness over our checkpoints. Importing this module registers the model class as
`hybrid` (alias `ours`) in lm_eval's registry; lm_eval has no plugin hook for models, so its CLI
runs through this module, which takes the same arguments as `lm_eval`:

    python -m pretrain.evaluation.harness --model ours --model_args checkpoint=RUN_DIR \
        --tasks lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,openbookqa
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pretrain.evaluation.fewshot import Scorer


DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
          "float32": torch.float32}  # None: bf16 on CUDA, else fp32


@register_model("hybrid", "ours")
class HybridHarnessLM(LM):
    """model_args: checkpoint (run or step dir), data (prepared dir with the tokenizer; default the
    run's), dtype (auto | fp32 | bf16, or torch's names float32 | bfloat16), max_length (default:
    the training length). batch_size, device and
    max_batch_size come from lm_eval's own options (an 'auto' batch size is 8; max_batch_size is
    unused: batches are padded to their longest sequence)."""

    def __init__(self, checkpoint: str | None = None, data: str | None = None, dtype: str = "auto",
                 max_length: int | None = None, batch_size: int | str = 8, device: str | None = None,
                 max_batch_size: int | None = None, scorer: Scorer | None = None):
        super().__init__()
        if scorer is None:
            scorer = scorer_for(checkpoint, data, dtype, max_length, batch_size, device)
        self.scorer = scorer

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.scorer.loglikelihood([r.args[:2] for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            out.append(self.scorer.generate_until(context, [until] if isinstance(until, str) else list(until),
                                                  int(kwargs.get("max_gen_toks", 256))))
        return out


def scorer_for(checkpoint: str | None, data: str | None, dtype: str, max_length: int | None,
               batch_size: int | str, device: str | None) -> Scorer:
    from data_pipeline.errors import DataInputError
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.evaluation.subject import load_subject
    from pretrain.hf import CliError

    if not checkpoint:
        raise CliError("--model_args needs checkpoint=RUN_DIR (or a step_* dir)")
    if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
        if device:  # lm_eval's CLI passes --device, default cuda: on a CPU machine, run on the CPU as its HF model does
            print(f"device {device} is not available; evaluating on the CPU", file=sys.stderr)
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype not in DTYPES:
        raise CliError(f"--model_args dtype={dtype}: not one of {', '.join(DTYPES)}")
    subject = load_subject(Path(checkpoint))
    dt = DTYPES[dtype] or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    batch = 8 if str(batch_size).startswith("auto") else int(batch_size)
    try:  # data prepared with the run's tokenizer, as `pretrain.evaluate` checks it
        tok = load_tokenizer(subject.checked_data_dir(data))
    except DataInputError as e:
        raise CliError(f"--model_args data: {e}") from None
    return Scorer(subject.model.to(dev), tok, int(max_length or subject.train_seq_len), batch, dev, dt)


@functools.cache
def task_manager(include: str | None):
    """lm-eval's task index (indexing every task YAML takes seconds: built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include) if include else TaskManager()


def check_tasks(tasks: Sequence[str], include: str | None) -> None:
    """Unknown task names stop an evaluation before any model loads (lm-eval itself raises a
    KeyError once the suites before it have run)."""
    from pretrain.hf import CliError

    known = set(task_manager(include).all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
    if unknown:
        raise CliError(f"--fewshot-tasks: {', '.join(unknown)} is not an lm-eval task, group or tag (see `lm_eval ls "
                       f"tasks`{'' if include else '; local task YAMLs go in --fewshot-include DIR'})")


def metric_name(key: str) -> str:
    """lm-eval's 'metric,filter' key as we report it: the metric alone for its unfiltered value
    ('acc,none' -> 'acc'), else 'metric,filter' (gsm8k's 'exact_match,strict-match' and
    'exact_match,flexible-extract' are two results)."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else key


def evaluate_tasks(scorer: Scorer, tasks: list[str], limit: int | None, include: str | None) -> dict[str, Any]:
    """Run lm-eval's tasks; {"tasks": {task or group: {metric: value}}, "average": mean acc of the
    tasks (groups, which lm-eval reports beside their tasks, are not counted again)}."""
    from lm_eval import simple_evaluate

    result = simple_evaluate(model=HybridHarnessLM(scorer=scorer), tasks=tasks, limit=limit,
                             task_manager=task_manager(include), log_samples=False)
    metrics = {task: {metric_name(k): v for k, v in values.items()
                      if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k}
               for task, values in result["results"].items()}
    groups = set(result.get("groups") or ())
    accs = [m["acc"] for task, m in metrics.items() if "acc" in m and task not in groups]
    return {"tasks": metrics, "average": sum(accs) / len(accs) if accs else None, "limit": limit}


def main() -> int:
    """lm-eval's CLI; a bad checkpoint argument (`CliError`) is one line and exit 2, as `pretrain.evaluate`."""
    from lm_eval.__main__ import cli_evaluate

    from pretrain.hf import CliError

    try:
        cli_evaluate()
    except CliError as err:
        print(f"pretrain.evaluation.harness: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
