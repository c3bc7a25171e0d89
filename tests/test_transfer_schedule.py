"""The schedule rule of docs/benchmark.md (section 3), as benchmarks/transfer_schedule.py
applies it to the calibration runs' validation curves."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from transfer_schedule import choose, settled_step


def run(curve: list[tuple[int, float]], higher: bool = True) -> dict:
    values = [v for _, v in curve]
    return {"curve": curve, "best": max(values) if higher else min(values)}


def test_settled_step_is_the_first_quarter_within_one_percent_of_the_best() -> None:
    curve = [(100, 0.2), (200, 0.5), (300, 0.6), (400, 0.7), (500, 0.695), (600, 0.7)]
    assert settled_step(curve, True, 800) == 400  # 0.7 at 400; 0.5 at 200 is far off
    # Never settled before the end: the whole budget.
    assert settled_step([(200, 0.1), (400, 0.2), (600, 0.3), (800, 0.4)], True, 800) == 800
    # Lower is better (AbsRel): within 1% of the minimum.
    low = [(200, 0.30), (400, 0.201), (600, 0.20), (800, 0.22)]
    assert settled_step(low, False, 800) == 400


def test_rate_with_the_best_mean_over_backbones_and_steps_that_suit_both() -> None:
    fast = [(100, 0.5), (200, 0.8), (300, 0.8), (400, 0.8)]
    slow = [(100, 0.2), (200, 0.4), (300, 0.6), (400, 0.79)]
    runs = {
        "0.01": {"scratch": run(fast), "multitask": run([(400, 0.70)])},
        "0.03": {"scratch": run(fast), "multitask": run(slow)},  # mean 0.795, the best
        "0.1": {"scratch": run([(400, 0.1)]), "multitask": run([(400, 0.9)])},
    }
    # The slowest backbone decides the steps: 0.79 is reached only at the end.
    assert choose(runs, True, 400) == (0.03, 400)


def test_a_tie_keeps_the_lower_rate_and_lower_is_better_is_respected() -> None:
    flat = [(100, 0.3), (200, 0.3), (300, 0.3), (400, 0.3)]
    tie = {"0.3": {"a": run(flat, False)}, "0.1": {"a": run(flat, False)}}
    assert choose(tie, False, 400) == (0.1, 100)
    errors = {"0.1": {"a": run([(400, 0.4)], False)}, "0.3": {"a": run([(400, 0.2)], False)}}
    assert choose(errors, False, 400)[0] == 0.3
