"""What the benchmarks report besides their samples: median and p90, and how loaded the machine was."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence


def median_p90(samples: Sequence[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return (samples[0], samples[0]) if samples else (float("nan"), float("nan"))
    return statistics.median(samples), statistics.quantiles(samples, n=10, method="inclusive")[-1]


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()
