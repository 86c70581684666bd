"""Random SSD scan inputs on the GPU, shared by the kernel tests (plain and document-masked)."""
import torch


def ssd_inputs(length: int, b: int = 2, h: int = 8, p: int = 64, n: int = 64, groups: int = 2):
    """(x, dt, A, B, C, s0) for `ssd_scan`, seeded; fp32 on CUDA."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, length, h, p, device="cuda", generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, length, h, device="cuda", generator=g) - 2)
    A = -torch.rand(h, device="cuda", generator=g) * 2
    B, C = (torch.randn(b, length, groups, n, device="cuda", generator=g) for _ in range(2))
    s0 = torch.randn(b, h, p, n, device="cuda", generator=g)
    return x, dt, A, B, C, s0
