"""A stub upstream model provider whose latency follows its local hour of day.

Why a curve in the provider's own time zone: a provider in New York is
slowest in New York's business hours, whatever the caller's clock says; the
analyzer's hour-of-day baselines (spec section 6, ``tailscope.provider.region``)
must find that. Latency per call = (base + per-token cost x output tokens)
x load(local hour) x lognormal noise (seeded; the same noise is used in the
counterfactual, so only the load curve differs).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Provider:
    region: str = "America/New_York"
    system: str = "openai"
    address: str = "api.provider.example"
    base_s: float = 0.25
    per_token_s: float = 0.004
    peak: float = 3.0  # load multiplier at the busiest local hour
    peak_hour: float = 13.0  # local time of the peak
    width_h: float = 2.5  # spread of the busy period (hours, gaussian)
    noise: float = 0.15  # lognormal sigma

    def load(self, epoch_s: float) -> float:
        """Load multiplier at ``epoch_s`` from the provider's local hour (1.0 off-peak)."""
        local = datetime.fromtimestamp(epoch_s, tz=timezone.utc).astimezone(ZoneInfo(self.region))
        h = local.hour + local.minute / 60 + local.second / 3600
        d = min(abs(h - self.peak_hour), 24 - abs(h - self.peak_hour))
        return 1.0 + (self.peak - 1.0) * math.exp(-0.5 * (d / self.width_h) ** 2)

    def busy_hours_utc(self, day_epoch: float, threshold: float = 1.5) -> tuple[float, float]:
        """The [start, end) epoch span of the day around ``day_epoch`` where load > threshold."""
        step = 60.0
        start = end = None
        t = day_epoch - 12 * 3600
        while t < day_epoch + 36 * 3600:
            if self.load(t) > threshold:
                if start is None:
                    start = t
                end = t + step
            elif start is not None:
                break
            t += step
        if start is None or end is None:
            raise ValueError("the provider's load never passes the threshold")
        return start, end

    def latency(self, epoch_s: float, output_tokens: int, rng: random.Random, loaded: bool = True) -> float:
        noise = math.exp(rng.gauss(0.0, self.noise))
        work = self.base_s + self.per_token_s * output_tokens
        return work * (self.load(epoch_s) if loaded else 1.0) * noise
