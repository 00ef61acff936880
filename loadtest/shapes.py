"""Load scenarios as pure schedules: `users_at(scenario, t, ...)` -> (users, spawn_rate) or None when done.

`ScenarioShape` in the locustfile calls these from `tick()`; keeping the arithmetic here makes it testable
without a running Locust. Every scenario scales with Locust's usual `--users`, `--spawn-rate`, `--run-time`:

- steady: ramp up to `users` at `spawn_rate` and hold them for the whole run.
- ramp: a staircase of STEPS equal steps from users/STEPS to `users` over the run; each step is held long
  enough to measure, so throughput and latency per step give the latency-throughput curve and its knee.
- spike: a baseline of users/5 for 40% of the run, all `users` at once for 20%, back to the baseline.
"""

from __future__ import annotations

import math

SCENARIOS = ("steady", "ramp", "spike")
RAMP_STEPS = 8
SPIKE_BASELINE_FRACTION = 0.2
DEFAULT_RUN_TIME_S = 60.0  # in Locust's web UI the run time is optional; shapes need a horizon


def users_at(
    scenario: str, elapsed: float, users: int, spawn_rate: float, run_time: float
) -> tuple[int, float] | None:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if elapsed >= run_time:
        return None
    users = max(1, users)
    if scenario == "steady":
        return users, spawn_rate
    if scenario == "ramp":
        steps = min(RAMP_STEPS, users)
        step = min(steps - 1, int(elapsed / (run_time / steps)))
        # New users of a step start at once: the step's measurement window should be at its full load.
        return math.ceil(users * (step + 1) / steps), max(spawn_rate, float(users))
    baseline = max(1, round(users * SPIKE_BASELINE_FRACTION))
    in_spike = 0.4 * run_time <= elapsed < 0.6 * run_time
    return (users if in_spike else baseline), max(spawn_rate, float(users))


def ramp_steps(users: int) -> list[int]:
    """The user counts a ramp visits, in order (for reports)."""
    steps = min(RAMP_STEPS, max(1, users))
    return [math.ceil(users * (i + 1) / steps) for i in range(steps)]
