"""The final losses of a plan's points: each finished run's last validation NLL (`summary.json`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from pretrain.scaling.fit import Observation
from pretrain.scaling.plan import Point
from pretrain.scaling.run import finished


def observations(points: list[Point]) -> tuple[list[Observation], list[str]]:
    """(observations of finished points, ids of points without a final NLL)."""
    obs, missing = [], []
    for p in points:
        nll = json.loads((Path(p.run_dir) / "summary.json").read_text()).get("last_val_nll") if finished(p) else None
        if nll is None or not math.isfinite(nll):
            missing.append(p.id)
            continue
        obs.append(Observation(p.arch, p.budget, p.params, p.flops_per_token, nll))
    return obs, missing
