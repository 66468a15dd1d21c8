"""The autoscaler's decisions on load traces (controller/autoscaler.py): no sockets, no clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelfleet.controller.autoscaler import Decision, ScaleState, advice, decide, model_loads
from modelfleet.models import AutoscalePolicy, InstanceLoad, LoadReport, ModelLoad

POLICY = AutoscalePolicy(
    min_replicas=1,
    max_replicas=8,
    target_ongoing=4,
    up_delay_s=2,
    down_delay_s=10,
    window_s=3,
    max_step=4,
    idle_after_s=60,
)


def run(
    policy: AutoscalePolicy, trace: list[tuple[float, float | None]], start: int = 1, dt: float = 1.0
) -> list[tuple[float, int, str]]:
    """Feed (duration, load) segments, one decision per ``dt``; the desired count is applied
    at once (as the store write would be). Returns (time, desired, reason) for each change."""
    state, current, now = ScaleState(), start, 0.0
    changes = []
    for duration, load in trace:
        end = now + duration
        while now < end:
            d = decide(policy, state, current, load, now)
            if d.desired != current:
                changes.append((now, d.desired, d.reason))
                current = d.desired
            now += dt
    return changes


def test_advice_is_load_over_target_within_bounds() -> None:
    assert advice(POLICY, 0) == 1
    assert advice(POLICY, 4) == 1
    assert advice(POLICY, 4.01) == 2
    assert advice(POLICY, 16) == 4
    assert advice(POLICY, 1000) == 8


def test_a_burst_scales_up_within_the_up_delay_in_bounded_steps() -> None:
    # idle, then 8x one replica's target: 32 ongoing requests.
    changes = run(POLICY, [(5, 0), (20, 32)])
    assert changes[0][1] == 5  # 1 + max_step 4
    assert changes[0][0] - 5 <= POLICY.up_delay_s + 1  # within the delay (plus one decision)
    assert "up 1 -> 5" in changes[0][2]
    assert changes[1][1] == 8  # then the rest, bounded by max_replicas
    assert changes[1][0] - changes[0][0] >= POLICY.up_delay_s
    assert len(changes) == 2


def test_a_short_lull_does_not_scale_down_a_long_one_does() -> None:
    changes = run(POLICY, [(20, 32), (5, 0), (20, 32)], start=8)
    assert changes == []  # 5 s of nothing < down delay 10 s
    changes = run(POLICY, [(20, 32), (30, 0)], start=8)
    downs = [c for c in changes if "down" in c[2]]
    assert downs and downs[0][1] == 4  # 8 - max_step
    assert downs[0][0] >= 20 + POLICY.down_delay_s
    assert changes[-1][1] == 1  # never below max(min, 1) without idleness


def test_noisy_load_around_the_target_does_not_flap() -> None:
    trace = [(1, 7 if i % 2 else 9) for i in range(60)]  # mean 8 = 2 replicas' worth
    changes = run(POLICY, trace, start=2)
    assert changes == []


def test_scale_to_zero_after_idle_after_and_back_at_once_on_a_request() -> None:
    policy = POLICY.model_copy(update={"min_replicas": 0, "idle_after_s": 30})
    changes = run(policy, [(10, 2), (40, 0)], start=1)
    assert [c[1] for c in changes] == [0]
    assert changes[0][0] >= 10 + 30 - 1
    assert "no request for" in changes[0][2]
    # At zero a waiting request starts one replica at the next decision, no delay.
    state = ScaleState()
    assert decide(policy, state, 0, 0, 0.0).desired == 0
    d = decide(policy, state, 0, 1, 1.0)
    assert d.desired == 1 and "zero replicas" in d.reason


def test_min_one_never_goes_to_zero() -> None:
    changes = run(POLICY, [(200, 0)], start=1)
    assert changes == []


def test_a_new_leader_does_not_stop_replicas_it_knows_nothing_about() -> None:
    policy = POLICY.model_copy(update={"min_replicas": 0, "idle_after_s": 30})
    state = ScaleState()
    # Its first decision at t=1000: idle time counts from then, not from its clock's zero.
    assert decide(policy, state, 1, 0, 1000.0).desired == 1
    assert decide(policy, state, 1, 0, 1029.0).desired == 1
    assert decide(policy, state, 1, 0, 1030.0).desired == 0


def test_no_report_at_all_holds() -> None:
    changes = run(POLICY, [(100, None)], start=6)
    assert changes == []
    d = decide(POLICY, ScaleState(), 6, None, 0.0)
    assert d == Decision(6, "no load report from any gateway: holding", 0.0)


def test_out_of_bounds_is_corrected_at_once() -> None:
    assert decide(POLICY, ScaleState(), 20, 0, 0.0).desired == 8
    assert decide(POLICY.model_copy(update={"min_replicas": 3}), ScaleState(), 1, 0, 0.0).desired == 3


def test_model_loads_sum_every_gateway() -> None:
    reports = [
        LoadReport(source="g1#0", models={"m": ModelLoad(in_flight=3, queued=2), "e": ModelLoad(in_flight=1)}),
        LoadReport(source="g2#0", models={"m": ModelLoad(in_flight=4)}, instances={"i": InstanceLoad(in_flight=4)}),
    ]
    assert model_loads(reports) == {"m": 9.0, "e": 1.0}


@pytest.mark.parametrize(
    "bad",
    [
        {"min_replicas": 5, "max_replicas": 2},
        {"target_ongoing": 0},
        {"max_replicas": 0},
        {"min_replicas": -1},
        {"idle_after_s": 0},
        {"max_step": 0},
        {"surprise": 1},
    ],
)
def test_policy_is_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AutoscalePolicy(**bad)  # type: ignore[arg-type]


def test_a_replica_still_loading_is_not_idle_time() -> None:
    policy = POLICY.model_copy(update={"min_replicas": 0, "idle_after_s": 4})
    state = ScaleState()
    # Deployed at t=0, the model loads for 10 s: no request could have come; no zero yet.
    for t in range(11):
        assert decide(policy, state, 1, 0, float(t), ready=0).desired == 1
    assert decide(policy, state, 1, 0, 13.0, ready=1).desired == 1
    assert decide(policy, state, 1, 0, 14.0, ready=1).desired == 0
