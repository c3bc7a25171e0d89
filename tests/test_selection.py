"""Checkpoint selection: the validation score ``val/score`` that ``best.ckpt`` is chosen on."""

from __future__ import annotations

import io
import math

import pytest
import torch

from must.config import StudentConfig, load_config
from must.models.model import MultiTaskModel
from must.tasks import build_task
from must.training.module import SCORE_FLOOR, MultiTaskModule
from tiny import TINY_MODEL

CLASSES = {"classification": ["a", "b"], "detection": ["a", "b"], "segmentation": ["a", "b"]}


def module(*names: str, reference: dict[str, float] | None = None) -> MultiTaskModule:
    cfg = load_config(StudentConfig, None, TINY_MODEL)
    tasks = {n: build_task(n, CLASSES.get(n)) for n in names}
    return MultiTaskModule(MultiTaskModel(cfg.model.backbone, tasks), cfg.train, None, reference)


def score(m: MultiTaskModule, **primary: float) -> float:
    keys = {n: t.primary_metric for n, t in m.model.tasks.items()}
    return m.selection_score({n: {keys[n]: v} for n, v in primary.items()})[0]


def test_a_single_task_is_selected_on_its_primary_metric_as_before():
    assert score(module("classification"), classification=0.7) == 0.7
    depth = module("depth")
    assert depth.selection_score({"depth": {"abs_rel": 0.25}}) == (-0.25, {})
    assert depth.selection_score({}) == (-math.inf, {})
    assert depth.score_reference == {}


def test_mixed_scales_do_not_let_the_task_with_the_largest_numbers_decide():
    # Checkpoint A: top-1 0.9, normals 30 degrees. Checkpoint B: normals 2 degrees better,
    # classification collapsed to 0.1.
    a = {"classification": 0.9, "normals": 30.0}
    b = {"classification": 0.1, "normals": 28.0}
    raw = {k: (v["classification"] - v["normals"]) / 2 for k, v in (("a", a), ("b", b))}
    assert raw["b"] > raw["a"]  # the raw mean of higher-is-better values picks B
    m = module("classification", "normals")
    first = score(m, **a)  # the first validation sets the references
    assert first == 0.0
    assert m.score_reference == a
    later = score(m, **b)
    # (log(0.1 / 0.9) + log(30 / 28)) / 2
    assert later == pytest.approx((math.log(0.1 / 0.9) + math.log(30 / 28)) / 2)
    assert later < first  # A is kept
    # The same holds whichever checkpoint came first: the reference is a constant shift.
    m = module("classification", "normals")
    assert score(m, **b) == 0.0 and score(m, **a) > 0.0


def test_a_zero_reference_or_value_is_floored_and_undefined_values_are_left_out():
    m = module("classification", "detection")
    assert score(m, classification=0.5, detection=0.0) == 0.0  # mAP 0 at the first validation
    assert m.score_reference == {"classification": 0.5, "detection": 0.0}
    _, terms = m.selection_score({"classification": {"top1": 0.5}, "detection": {"map": 0.2}})
    assert terms == pytest.approx({"classification": 0.0, "detection": math.log(0.2 / SCORE_FLOOR)})
    _, terms = m.selection_score({"classification": {"top1": 0.0}, "detection": {"map": 0.0}})
    assert terms == pytest.approx({"classification": math.log(SCORE_FLOOR / 0.5), "detection": 0})
    # COCO's -1 (no ground truth) and NaN (nothing scored) say nothing about the weights.
    for undefined in (-1.0, math.nan):
        s, terms = m.selection_score(
            {"classification": {"top1": 1.0}, "detection": {"map": undefined}}
        )
        assert terms == {"classification": pytest.approx(math.log(2))}
        assert s == pytest.approx(math.log(2))
    # A task undefined at the first validation takes its reference later.
    m = module("classification", "segmentation")
    assert score(m, classification=0.5, segmentation=math.nan) == 0.0
    assert "segmentation" not in m.score_reference
    assert score(m, classification=0.5, segmentation=0.3) == 0.0
    assert m.score_reference["segmentation"] == 0.3


def test_lower_is_better_metrics_are_turned_so_that_an_improvement_scores_higher():
    m = module("depth", "normals")
    assert score(m, depth=0.5, normals=40.0) == 0.0
    _, terms = m.selection_score({"depth": {"abs_rel": 0.25}, "normals": {"mean_angle": 80.0}})
    assert terms == pytest.approx({"depth": math.log(2), "normals": -math.log(2)})


def test_a_teachers_reference_is_kept_and_only_shifts_the_score():
    teachers = {"classification": 0.8, "depth": 0.2}
    m = module("classification", "depth", reference=teachers)
    # As good as the teachers: 0; the first validation does not replace their values.
    assert score(m, classification=0.8, depth=0.2) == 0.0
    assert score(m, classification=0.4, depth=0.2) == pytest.approx(math.log(0.5) / 2)
    assert m.score_reference == teachers


def test_resuming_keeps_the_reference_of_the_interrupted_run():
    m = module("classification", "normals")
    score(m, classification=0.6, normals=35.0)  # the first validation, before the interruption
    checkpoint: dict = {}
    m.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)  # as resuming reads checkpoints
    resumed = module("classification", "normals")
    resumed.on_load_checkpoint(restored)
    later = {"classification": 0.7, "normals": 30.0}
    assert score(resumed, **later) == pytest.approx(score(m, **later))
    assert score(resumed, **later) > 0.0
    # Without the saved reference the resumed run would score its first validation as 0.
    fresh = module("classification", "normals")
    assert score(fresh, **later) == 0.0
