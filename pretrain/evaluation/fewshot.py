"""`fewshot` suite: our checkpoints under lm-evaluation-harness (the paper's LAMBADA, HellaSwag, PIQA,
ARC-e/c, OpenBookQA). `Scorer` answers the harness's three request kinds with our model and
tokenizer (lm_eval only for its rolling windows); `pretrain.evaluation.harness` wraps it as an
lm_eval model class (`--model hybrid`), imported only when the suite runs (`pip install
'hybrid-pretrain[eval]'`).

Token handling follows the harness's own HF model: BOS starts every sequence (as in training), a
context's trailing whitespace moves to the continuation, and the continuation's tokens are those of
encode(context + continuation) past encode(context), so the split follows the tokenizer's merges
across the boundary. Where a merge crosses it (encode(context) is not a prefix of the whole), the
two are encoded apart. Sequences longer than `max_length` keep their last tokens; rolling
log-likelihoods use the harness's own windows; generation stops at the first `until` string or EOS.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.tokenizer import Tokenizer
from pretrain.evaluation.scoring import autocast
from pretrain.hf import CliError


class Scorer:
    def __init__(self, model, tokenizer: Tokenizer, max_length: int, batch_size: int = 8,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
        self.model, self.tok, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size
        self.device, self.dtype = device, dtype
        self._warned_room = False

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        whole = self.tok.encode(stripped + continuation)
        ctx = self.tok.encode(stripped)
        if whole[:len(ctx)] != ctx or len(whole) == len(ctx):
            return [self.tok.bos_id, *ctx], self.tok.encode(continuation)
        return [self.tok.bos_id, *ctx], whole[len(ctx):]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""
        rows = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in pairs]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = len(rows[chunk[0]]) - 1
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, i in enumerate(chunk):
                inputs[j, :len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
            with autocast(self.device, self.dtype):
                hidden = self.model.hidden_states(inputs.to(self.device))
            for j, i in enumerate(chunk):
                n_in, n_cont = len(rows[i]) - 1, min(len(pairs[i][1]), len(rows[i]) - 1)
                if n_cont == 0:  # an empty continuation is certain
                    out[i] = (0.0, True)
                    continue
                logits = self.model.head(hidden[j, n_in - n_cont:n_in]).float()
                target = torch.tensor(rows[i][-n_cont:], device=logits.device)
                logp = F.log_softmax(logits, dim=-1)
                out[i] = (float(logp.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score([self.encode_pair(ctx, cont) for ctx, cont in requests])

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Log-likelihood of whole texts over the harness's windows: disjoint predicted spans of up
        to `max_length` tokens, each conditioned on as many tokens before it as fit (BOS first)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for text in texts:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok.encode(text), prefix_token=self.tok.bos_id, max_seq_len=self.max_length,
                context_len=1)]
            totals.append(sum(lp for lp, _ in self.score(windows)))
        return totals

    @torch.no_grad()
    def generate_until(self, context: str, until: list[str], max_new_tokens: int) -> str:
        """Greedy continuation of `context`, cut at EOS and before the first of the `until` strings
        (the generation ends soon after either shows, not at max_new_tokens).
        The context keeps its last max_length - max_new_tokens tokens, as the harness's HF model
        does; where that leaves none, its last max_length (the generation then runs past the
        training length, which the harness's model refuses), said once."""
        room = self.max_length - max_new_tokens
        if room < 1 and not self._warned_room:
            print(f"fewshot: max_gen_toks {max_new_tokens} >= the model's max_length {self.max_length}: contexts keep "
                  f"their last {self.max_length} tokens and generation runs past the training length", file=sys.stderr)
            self._warned_room = True
        ids = [self.tok.bos_id, *self.tok.encode(context)][-(room if room >= 1 else self.max_length):]
        prompt = torch.tensor([ids], device=self.device)
        with autocast(self.device, self.dtype):
            out = self.model.generate(prompt, max_new_tokens=max_new_tokens,
                                      stop=lambda new: self._cut(new[0].tolist(), until) is not None)
        new = out[0, len(ids):].tolist()
        cut = self._cut(new, until)
        return cut if cut is not None else self.tok.decode(new)

    def _cut(self, new: list[int], until: list[str]) -> str | None:
        """The text of `new` cut at EOS or before the first `until` string; None where neither occurs."""
        ended = self.tok.eos_id in new
        text = self.tok.decode(new[:new.index(self.tok.eos_id)] if ended else new)
        cuts = [text.index(u) for u in until if u and u in text] + ([len(text)] if ended else [])
        return text[:min(cuts)] if cuts else None


def harness():
    """pretrain.evaluation.harness (it imports lm-eval, an optional dependency)."""
    try:
        from pretrain.evaluation import harness
    except ImportError as e:
        raise CliError(f"--suite fewshot needs lm-evaluation-harness ({e}); pip install 'hybrid-pretrain[eval]'") \
            from None
    return harness


def run_fewshot(subject, data_dir: Path, tasks: list[str], limit: int | None, include: str | None,
                device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """lm-eval's metrics per task, and their mean accuracy ('average', the paper's few-shot column)."""
    from data_pipeline.tokenizer import load_tokenizer

    evaluate_tasks = harness().evaluate_tasks  # before the tokenizer: lm-eval missing is the first thing to say
    scorer = Scorer(subject.model, load_tokenizer(data_dir), subject.train_seq_len, device=device, dtype=dtype)
    return evaluate_tasks(scorer, tasks, limit, include)
