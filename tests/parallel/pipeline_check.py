"""Shared worker for the pipeline-parallel tests: the same tiny model in 1 process and split into
pipeline stages over N gloo processes (alone or with FSDP / TP / CP), each optimizer step
accumulating two pipeline batches; the loss and every gradient of the first step, the global
gradient norm and the losses of 3 clipped AdamW steps compared."""
from __future__ import annotations


import torch
import torch.distributed as dist

from layout_check import SEQ, doc_starts, full, rel, run_cases
from parallel.context_parallel import shard_index
from parallel.grad_norm import clip_grad_norm_
from parallel.init import init_sharded
from parallel.mesh import ParallelDims, build_mesh
from parallel.pipeline import build_pipeline, local_stage_ids, stages_per_rank
from pretrain.model import build_model
from pretrain.model.lm import STOP_EVERY
from pretrain.model.packed import PackedDocs
from pretrain.model.parallelize import parallelize_hybrid, pipeline_model
from pretrain.model.pattern import parse_pattern


def compare(arch: str, overrides: dict, dims: ParallelDims, schedule: str, microbatches: int,
            steps: int = 3, masked: bool = False, dtype: str = "float32") -> dict:
    """Losses of `steps` AdamW steps (grad-clipped by the global norm) and the first step's worst
    relative gradient error over this rank's parameters; `masked`: over packed documents
    (layout_check.DOC_STARTS), their metadata carried to every stage; `dtype` the default dtype
    both models are built in. The reference runs the pipeline's microbatches one by one (the MoE
    balance loss, when on, is a per-microbatch term: its mean over them is the objective)."""
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        return _compare(arch, overrides, dims, schedule, microbatches, steps, masked)
    finally:
        torch.set_default_dtype(torch.float32)


def build(arch: str, overrides: dict, dims: ParallelDims, schedule: str, microbatches: int):
    """(the whole model, this rank's pipelined stages as one model, their Pipeline, the mesh),
    the same weights in both, in the default dtype."""
    torch.manual_seed(0)
    ref = build_model(arch, "tiny", tie_embeddings=False, **overrides)
    template = build_model(arch, "tiny", device="meta", tie_embeddings=False, **overrides)
    cfg = ref.config
    mesh = build_mesh(dims.resolve(dist.get_world_size()), "cpu")
    pp_mesh = mesh.pp_mesh()
    per_rank = stages_per_rank(schedule, None, pp_mesh.size())
    stages = parse_pattern(cfg.pattern).stages
    ids = local_stage_ids(schedule, pp_mesh.get_local_rank(), pp_mesh.size(), per_rank)
    dtype = torch.get_default_dtype()
    model, modules = parallelize_hybrid(pipeline_model(cfg, stages, ids), mesh, param_dtype=dtype, reduce_dtype=dtype,
                                        stages=stages, stage_ids=ids)
    torch.manual_seed(0)
    init_sharded(model, template, "cpu")
    pipe = build_pipeline(modules, ids, len(stages), schedule, microbatches, pp_mesh.get_group(), torch.device("cpu"))
    return ref, model, pipe, mesh


def _compare(arch: str, overrides: dict, dims: ParallelDims, schedule: str, microbatches: int, steps: int,
             masked: bool) -> dict:
    ref, model, pipe, mesh = build(arch, overrides, dims, schedule, microbatches)
    cfg, pp_mesh = ref.config, mesh.pp_mesh()
    dp_rank, dp_size = mesh.dp_coordinate()
    cp_rank, cp = mesh.world["cp"].get_local_rank(), mesh.world["cp"].size()
    positions = shard_index(SEQ, cp, cp_rank)
    batch = max(8, dp_size * 2 * microbatches)  # rows: at least one per microbatch of every dp rank
    starts = doc_starts(batch) if masked else None

    def docs(rows: slice) -> PackedDocs | None:
        return PackedDocs.from_starts(starts[rows, :-1]) if masked else None

    def pipe_run(rows: slice, tokens: torch.Tensor, train: bool, accumulation: int = 1) -> torch.Tensor | None:
        part = tokens[rows]
        if masked:
            shard = docs(rows).select(positions)
            kwargs = {"positions": shard.positions, "doc": shard.doc}
        else:
            kwargs = {"positions": positions.expand(part.shape[0], -1)}
        return pipe.run(part[:, :-1][:, positions], part[:, 1:][:, positions], train, accumulation, **kwargs)

    def ref_loss(tokens: torch.Tensor, groups: int) -> torch.Tensor:
        """Mean over `groups` equal row groups (the pipeline microbatches of every dp rank)."""
        size = tokens.shape[0] // groups
        rows = [slice(g * size, (g + 1) * size) for g in range(groups)]
        return sum(ref.loss(tokens[r, :-1], tokens[r, 1:], docs(r)) for r in rows) / groups

    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    out = {"ref": [], "par": [], "grad_rel": {}}
    tokens = torch.randint(0, cfg.vocab_size, (batch, SEQ + 1), generator=torch.Generator().manual_seed(99))
    mine = slice(dp_rank * batch // dp_size, (dp_rank + 1) * batch // dp_size)
    ref.eval(), model.eval()
    with torch.no_grad():  # validation: forward only
        out["eval"] = [ref_loss(tokens, 1).item(), share(pipe_run(mine, tokens, False), mesh)]
    ref.train(), model.train()
    for step in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (batch, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
        rows = tokens.shape[0] // dp_size
        loss_ref = ref_loss(tokens, dp_size * 2 * microbatches)
        loss_ref.backward()
        loss_sum = torch.zeros(())
        for half in range(2):  # gradient accumulation over two pipeline batches
            start = dp_rank * rows + half * rows // 2
            loss = pipe_run(slice(start, start + rows // 2), tokens, True, accumulation=2)
            loss_sum += 0 if loss is None else loss / 2
        out["ref"].append(loss_ref.item())
        out["par"].append(share(loss_sum, mesh))
        if step == 0:
            ref_grads = dict(ref.named_parameters())
            out["grad_rel"] = {n: rel(full(p.grad), ref_grads[n].grad) for n, p in model.named_parameters()}
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        norm = clip_grad_norm_(model.parameters(), 1.0, pp_mesh.get_group())
        out.setdefault("norm_rel", []).append(abs(norm.item() - norm_ref.item()) / norm_ref.item())
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return out


def share(loss: torch.Tensor | None, mesh) -> float:
    """The mean over every dp x cp rank's last stage (each counted tp times) of a loss that only
    last-stage ranks hold."""
    total = torch.zeros(1, dtype=torch.float64) if loss is None else loss.detach().double().reshape(1)
    dist.all_reduce(total)
    return total.item() / (mesh.dp_cp.size() * mesh.world["tp"].size())


def generation(arch: str, overrides: dict, dims: ParallelDims, schedule: str, masked: bool = False) -> dict:
    """Greedy generation (and sampling at temperature 0.8 from one seed; greedy with an EOS, which
    must change the tokens) on the pipelined model against the whole model in one process (its
    default, static-cache generate; `masked`: a prompt of packed documents, on growing caches in
    both): the tokens, and the largest difference of the logits that chose each new token, the
    prefill's first."""
    ref, model, pipe, _ = build(arch, overrides, dims, schedule, microbatches=2)
    ref.eval(), model.eval()
    cfg = ref.config
    prompt = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    starts = doc_starts(2)[:, :12] if masked else None
    out = {}
    for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        kw = dict(temperature=temperature, return_logits=True, doc_starts=starts)
        want, want_logits = ref.generate(prompt, 6, generator=torch.Generator().manual_seed(3), **kw)
        got, logits = model.generate(prompt, 6, generator=torch.Generator().manual_seed(3), pipeline=pipe, **kw)
        diff = (logits - want_logits).abs()
        out[name] = {"same_tokens": torch.equal(got, want), "prefill_diff": diff[:, 0].max().item(),
                     "logits_diff": diff.max().item()}
        if name == "greedy":  # the same with row 0's first new token as EOS: that row is EOS from then on
            eos = int(want[0, 12])
            want_eos, want_logits = ref.generate(prompt, 6, eos_id=eos, **kw)
            got, logits = model.generate(prompt, 6, eos_id=eos, pipeline=pipe, **kw)
            diff = (logits - want_logits).abs()
            out["eos"] = {"same_tokens": torch.equal(got, want_eos) and not torch.equal(want_eos, want),
                          "prefill_diff": diff[:, 0].max().item(), "logits_diff": diff.max().item()}
            # both rows that prompt: every row ends at its first token, so every pp rank stops at the
            # first check, after STOP_EVERY of the 2 x STOP_EVERY tokens asked
            same = dict(kw, doc_starts=starts[:1].expand(2, -1) if starts is not None else None)
            twice = prompt[:1].expand(2, -1)
            want_end, want_logits = ref.generate(twice, 2 * STOP_EVERY, eos_id=eos, **same)
            got, logits = model.generate(twice, 2 * STOP_EVERY, eos_id=eos, pipeline=pipe, **same)
            diff = (logits - want_logits).abs() if logits.shape == want_logits.shape else torch.full((1, 1), torch.inf)
            out["eos_early_end"] = {"same_tokens": torch.equal(got, want_end) and got.shape[1] == 12 + STOP_EVERY,
                                    "prefill_diff": diff[:, 0].max().item(), "logits_diff": diff.max().item()}
    return out


def pipeline_case(arch: str, overrides: dict, dims: dict, schedule: str, microbatches: int,
                  options: dict | None = None) -> dict:
    """One case of `worker`: options (optional) are compare's keywords; {"generate": True, ...}
    runs `generation` instead (with its keywords)."""
    options = dict(options or {})
    if options.pop("generate", False):
        return generation(arch, overrides, ParallelDims(**dims), schedule, **options)
    return compare(arch, overrides, ParallelDims(**dims), schedule, microbatches, **options)


def worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    run_cases(rank, world, port, cases, out_dir, pipeline_case, every_rank=True)
