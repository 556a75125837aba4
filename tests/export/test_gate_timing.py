"""The precision gate's speed comparison is made in lockstep (export/precision_variants.py
lockstep_ms): load that arrives while the gate runs hits every candidate alike. A fake clock
plays the load; nothing here depends on how fast this machine is."""

from __future__ import annotations

from fastsam2.export.precision import _pick
from fastsam2.export.precision_variants import lockstep_ms


class Clock:
    """Time advances only when a fake session runs: its own cost, plus `burst` ms on calls
    numbered from `burst_from` on (another process taking the cores half-way through)."""

    def __init__(self, burst_from: int, burst: float):
        self.t, self.calls, self.burst_from, self.burst = 0.0, 0, burst_from, burst

    def __call__(self) -> float:
        return self.t / 1e3

    def spend(self, ms: float) -> None:
        self.t += ms + (self.burst if self.calls >= self.burst_from else 0.0)
        self.calls += 1


class Graph:
    def __init__(self, clock: Clock, ms: float):
        self.clock, self.ms = clock, ms

    def run(self, feeds):
        self.clock.spend(self.ms)
        return {}


def test_load_half_way_does_not_decide_the_pick():
    feeds = [{}] * 8
    # one candidate after the other: the slower fp32 (10 ms) is timed before the burst and the
    # faster int8 (8 ms) inside it, so int8 looked 58 ms
    clock = Clock(burst_from=8, burst=50.0)
    one_by_one = {}
    for name, ms in (("fp32", 10.0), ("int8", 8.0)):
        one_by_one[name] = lockstep_ms({name: Graph(clock, ms)}, feeds, clock=clock)[name]
    assert one_by_one["int8"] > one_by_one["fp32"]
    # in lockstep the burst hits both on the same feeds: int8 stays the faster
    clock = Clock(burst_from=8, burst=50.0)
    both = lockstep_ms({"fp32": Graph(clock, 10.0), "int8": Graph(clock, 8.0)}, feeds, clock=clock)
    assert both["int8"] < both["fp32"]


def test_the_pick_follows_the_lockstep_times():
    kept = {("image_encoder", "int8"): {"outputs": {"ms_per_call": 50.0}}}
    gate = {"tried": {"fp32": {"ms_per_call": 100.0}}}
    assert _pick("image_encoder", ["int8"], kept, gate, explicit=False) == "int8"
    gate["lockstep_ms"] = {"fp32": 40.0, "int8": 60.0}
    assert _pick("image_encoder", ["int8"], kept, gate, explicit=False) == "fp32"
    assert _pick("image_encoder", ["int8"], kept, gate, explicit=True) == "int8"  # asked for
