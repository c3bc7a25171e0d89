"""Loss weighting: MuST's rule, learnt and dynamic weights, the registry."""

from __future__ import annotations

import math

import pytest
import torch

from must.config import StudentConfig, load_config
from must.errors import ConfigError
from must.student import make_weighting
from must.train.weighting import (
    WEIGHTINGS,
    DynamicWeightAverage,
    FixedWeights,
    UncertaintyWeighting,
    WeightingContext,
    build_weighting,
    must_weights,
    register_weighting,
)


def test_must_rule_is_linear_scaling_of_each_teachers_batch_and_lr():
    # Student b=256, lr=0.1. Teacher cls b=1024, lr=0.4 -> 256*0.4 / (1024*0.1) = 1.0;
    # det b=64, lr=0.08 -> 256*0.08 / (64*0.1) = 3.2; depth is set by hand.
    w = must_weights(
        256, 0.1, {"classification": (1024, 0.4), "detection": (64, 0.08), "depth": (32, 0.1)},
        hand={"depth": 0.5},
    )  # fmt: skip
    assert w == pytest.approx({"classification": 1.0, "detection": 3.2, "depth": 0.5})


def test_zero_or_nan_weights_are_refused_before_training():
    with pytest.raises(ConfigError, match="positive"):
        must_weights(32, 0.1, {"detection": (0, 0.1)})
    with pytest.raises(ConfigError, match="positive and finite"):
        FixedWeights({"depth": float("nan")})
    with pytest.raises(ConfigError, match="positive and finite"):
        must_weights(32, 0.1, {"segmentation": (32, 0.1)}, hand={"depth": 0.0})


def test_fixed_weights_sum_only_the_given_losses():
    total, used = FixedWeights({"a": 2.0, "b": 0.5})({"a": torch.tensor(3.0)})
    assert float(total) == 6.0 and used == {"a": 2.0}


def test_uncertainty_weighting_gradient_matches_its_formula():
    weighting = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    total, used = weighting({"a": torch.tensor(2.0), "b": torch.tensor(4.0)})
    # exp(-0)*2 + 0 + exp(-ln 2)*4 + ln 2
    assert float(total.detach()) == pytest.approx(2 + 2 + math.log(2.0))
    assert used == pytest.approx({"a": 1.0, "b": 0.5})
    total.backward()
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L
    assert weighting.log_vars.grad.tolist() == pytest.approx([1 - 2.0, 1 - 0.5 * 4.0])


def test_dwa_weights_follow_the_loss_ratios_of_the_last_two_windows():
    dwa = DynamicWeightAverage(["a", "b"], temperature=2.0, window=1)
    _, first = dwa({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    assert first == {"a": 1.0, "b": 1.0}  # no history yet: equal weights
    dwa({"a": torch.tensor(0.5), "b": torch.tensor(1.0)})
    # Ratios: a 0.5/1 = 0.5, b 1/1 = 1 -> w = 2 * softmax([0.25, 0.5]).
    _, w = dwa({"a": torch.tensor(0.5), "b": torch.tensor(1.0)})
    ea, eb = math.exp(0.25), math.exp(0.5)
    assert w["a"] == pytest.approx(2 * ea / (ea + eb))
    assert w["b"] == pytest.approx(2 * eb / (ea + eb))
    assert w["a"] + w["b"] == pytest.approx(2.0)


# --- the registry ---


def student(*overrides: str) -> StudentConfig:
    return load_config(StudentConfig, None, list(overrides))


def test_unknown_weighting_names_are_refused_listing_the_known_ones():
    known = "must, equal, fixed, uncertainty, dwa"
    with pytest.raises(ConfigError, match=rf"command line: loss\.kind: .*'gradnorm'.*{known}"):
        student("loss.kind=gradnorm")
    cfg = student()
    with pytest.raises(ConfigError, match=rf"loss\.kind: unknown .*'gradnorm'; known: {known}"):
        build_weighting("gradnorm", WeightingContext(["depth"], cfg.loss, cfg.train))


def test_a_registered_weighting_is_accepted_by_the_config_and_built(monkeypatch):
    import must.train.weighting as registry

    monkeypatch.setattr(registry, "WEIGHTINGS", dict(WEIGHTINGS))  # restored after the test

    @register_weighting("halves")
    def _halves(ctx: WeightingContext) -> FixedWeights:
        return FixedWeights({t: 0.5 for t in ctx.tasks})

    cfg = student("loss.kind=halves")
    assert "halves" not in WEIGHTINGS  # registered in the test's copy only
    weighting, resolved = make_weighting(cfg, ["depth", "normals"], {})
    assert resolved == {"kind": "halves", "weights": {"depth": 0.5, "normals": 0.5}}
    total, _ = weighting({"depth": torch.tensor(2.0), "normals": torch.tensor(4.0)})
    assert float(total) == 3.0


def test_existing_kinds_resolve_as_before():
    teachers = {"classification": {"info": {"training": {"classification": {
        "batch_size": 8, "lr": 0.1}}}}}  # fmt: skip
    cfg = student("train.batch_size=4", "train.lr=0.05")
    _, must = make_weighting(cfg, ["classification", "depth"], teachers)
    # 4 * 0.1 / (8 * 0.05) = 1.0; depth by hand.
    assert must == {"kind": "must", "weights": {"classification": 1.0, "depth": 1.0}}
    _, equal = make_weighting(student("loss.kind=equal"), ["depth"], {})
    assert equal == {"kind": "equal", "weights": {"depth": 1.0}}
    w, unc = make_weighting(student("loss.kind=uncertainty"), ["a", "b"], {})
    assert isinstance(w, UncertaintyWeighting) and unc["kind"] == "uncertainty"
    w, dwa = make_weighting(student("loss.kind=dwa", "loss.dwa_window=7"), ["a"], {})
    assert isinstance(w, DynamicWeightAverage) and dwa["window"] == 7
