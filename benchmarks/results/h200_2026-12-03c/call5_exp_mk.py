"""benchmarks/inference.py with the decode step's compilations given Inductor options: exp_mk.py OPTIONS
INFERENCE_ARGS... (OPTIONS: none, or comma list of multikernel, bigpersist)."""
import functools, sys
import torch

opts = set(sys.argv[1].split(","))
options = {}
if "multikernel" in opts:
    options["triton.multi_kernel"] = 1
if "bigpersist" in opts:  # persistent reductions up to 4096 elements (d_model 2048 rows)
    import torch._inductor.choices as ch
    from torch._inductor.runtime.hints import ReductionHint
    base = ch.InductorChoices.should_use_persistent_reduction

    def wide(features, cooperative_reduction):
        if features.get_reduction_hint() == ReductionHint.INNER:
            n = features.reduction_numel
            if getattr(n, "is_number", False) and int(n) <= 4096 and not cooperative_reduction:
                return True
        return base(features, cooperative_reduction)
    ch.InductorChoices.should_use_persistent_reduction = staticmethod(wide)
if options:
    torch.compile = functools.partial(torch.compile, options=options)
sys.path.insert(0, "benchmarks")
import inference
inference.main(sys.argv[2:])
