"""benchmarks/inference.py with experimental switches: exp.py SWITCHES INFERENCE_ARGS... (SWITCHES: comma list
of autotune, gnref, coord, or none; the call-2 switch `embed` is the committed path since 25dfd95)."""
import functools, os, sys
import torch

switches = set(sys.argv[1].split(","))
if "autotune" in switches:
    torch.compile = functools.partial(torch.compile, mode="max-autotune-no-cudagraphs")
if "coord" in switches:
    import torch._inductor.config as ic
    ic.coordinate_descent_tuning = True
if "gnref" in switches:
    import pretrain.model.norms as norms
    from pretrain.model.ops.gated_norm import gated_rms_norm_reference
    fast = norms.gated_rms_norm

    def gated(y, z, w, eps, n_groups=1):
        if torch.compiler.is_compiling():
            return gated_rms_norm_reference(y, z, w, eps, n_groups)
        return fast(y, z, w, eps, n_groups)
    norms.gated_rms_norm = gated
sys.path.insert(0, "benchmarks")
import inference
inference.main(sys.argv[2:])
