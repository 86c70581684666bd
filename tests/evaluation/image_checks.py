"""What a produced figure must be: a PNG with something drawn on it."""
from pathlib import Path

import numpy as np


def assert_nonempty_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape
    assert float(np.std(pixels[..., :3])) > 0.02, f"{path} is blank"
