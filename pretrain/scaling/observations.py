"""The final losses of a plan's points: each finished run's last validation NLL (`summary.json`)."""
from __future__ import annotations

import math

from pretrain.scaling.fit import Observation
from pretrain.scaling.plan import Point
from pretrain.scaling.run import finished, read_point_summary


def observations(points: list[Point]) -> tuple[list[Observation], list[str], list[str]]:
    """(observations of finished points, ids of points not finished, ids of points finished without a
    finite final NLL: a diverged run, or a validation split with nothing in it)."""
    obs, missing, without_nll = [], [], []
    for p in points:
        if not finished(p):
            missing.append(p.id)
            continue
        nll = read_point_summary(p).get("last_val_nll")
        if not isinstance(nll, (int, float)) or not math.isfinite(nll):
            without_nll.append(p.id)
            continue
        obs.append(Observation(p.arch, p.budget, p.params, p.flops_per_token, nll))
    return obs, missing, without_nll
