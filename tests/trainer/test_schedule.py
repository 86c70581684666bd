import pytest
import torch

from pretrain.config import ScheduleSection
from pretrain.schedule import build_scheduler, lr_multiplier


def curve(kind, total=100, **kw):
    cfg = ScheduleSection(kind=kind, **kw)
    return [lr_multiplier(s, total, cfg) for s in range(total)]


def test_trapezoid_warmup_plateau_cooldown():
    c = curve("trapezoid", warmup_frac=0.25, cooldown_frac=0.2)
    assert c[0] == pytest.approx(1 / 25) and c[24] == 1.0
    assert all(v == 1.0 for v in c[25:80])
    assert c[80] == 1.0 and c[99] == pytest.approx(1 / 20)
    assert all(a > b for a, b in zip(c[80:], c[81:]))


def test_wsd_and_cosine_and_floor():
    wsd = curve("wsd", warmup_frac=0.1, cooldown_frac=0.5)
    lin = curve("trapezoid", warmup_frac=0.1, cooldown_frac=0.5)
    assert all(w <= t for w, t in zip(wsd[50:], lin[50:])) and wsd[49] == 1.0
    cos = curve("cosine", warmup_frac=0.1, min_lr_ratio=0.1)
    assert cos[10] == pytest.approx(1.0) and min(cos[10:]) >= 0.1 - 1e-12
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    assert curve("constant", warmup_frac=0.0) == [1.0] * 100


def test_scheduler_state_resumes():
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = ScheduleSection()
    opt = torch.optim.SGD([p], lr=1.0)
    a = build_scheduler(opt, 40, cfg)
    for _ in range(13):
        opt.step()
        a.step()
    b = build_scheduler(torch.optim.SGD([p], lr=1.0), 40, cfg)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == a.get_last_lr() == [lr_multiplier(13, 40, cfg)]
