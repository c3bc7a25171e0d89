"""Loss weighting: MuST's rule, learnt and dynamic weights, the registry, PCGrad."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from must.config import StudentConfig, load_config
from must.errors import ConfigError
from must.models.model import MultiTaskModel
from must.stages.train import make_weighting
from must.summary import RunInfo
from must.tasks import build_task
from must.training.data import Collator
from must.training.module import MultiTaskModule
from must.weighting import (
    WEIGHTINGS,
    DynamicWeightAverage,
    FixedWeights,
    UncertaintyWeighting,
    WeightingContext,
    build_weighting,
    must_weights,
    register_weighting,
)
from must.weighting.pcgrad import PCGrad, project_conflicting
from tiny import TINY_MODEL


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
    known = "must, equal, fixed, uncertainty, dwa, pcgrad"
    with pytest.raises(ConfigError, match=rf"command line: loss\.kind: .*'gradnorm'.*{known}"):
        student("loss.kind=gradnorm")
    cfg = student()
    with pytest.raises(ConfigError, match=rf"loss\.kind: unknown .*'gradnorm'; known: {known}"):
        build_weighting("gradnorm", WeightingContext(["depth"], cfg.loss, cfg.train))


def test_a_registered_weighting_is_accepted_by_the_config_and_built(monkeypatch):
    import must.weighting as registry

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
    teacher = {"training": {"classification": {"dataset": "d", "batch_size": 8, "lr": 0.1}}}
    teachers = {"classification": RunInfo.read(teacher, "teacher")}
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


# --- PCGrad ---


def test_pcgrad_projects_only_conflicting_gradients_by_the_formula():
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0.
    # g1' = g1 - (g1.g2)/|g2|^2 g2 = (1, 0) + 1/2 (-1, 1) = (0.5, 0.5)   (g1'.g2 = 0)
    # g2' = g2 - (g2.g1)/|g1|^2 g1 = (-1, 1) + (1, 0) = (0, 1)            (g2'.g1 = 0)
    conflicting = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    assert project_conflicting(conflicting).tolist() == pytest.approx([0.5, 1.5])
    # g1 = (1, 0), g2 = (1, 1): g1.g2 = 1 > 0, nothing projected: the plain sum.
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert project_conflicting(agreeing).tolist() == pytest.approx([2.0, 1.0])
    # A zero gradient conflicts with nothing (and is never divided by).
    assert project_conflicting(torch.tensor([[0.0, 0.0], [1.0, 2.0]])).tolist() == [1.0, 2.0]


def tiny_module(kind: str, model: MultiTaskModel) -> MultiTaskModule:
    cfg = student(*TINY_MODEL, f"loss.kind={kind}")
    weighting, _ = make_weighting(cfg, list(model.tasks), {})
    return MultiTaskModule(model, cfg.train, weighting)


@pytest.fixture(scope="module")
def two_task_step():
    """A tiny classification + depth model and one batch labelled for both."""
    torch.manual_seed(0)
    cfg = student(*TINY_MODEL)
    tasks = {
        "classification": build_task("classification", ["a", "b", "c"]),
        "depth": build_task("depth", None),
    }
    model = MultiTaskModel(cfg.model.backbone, tasks)
    samples = [
        {
            "key": f"im{i}",
            "image": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8),
            "classification": i % 3,
            "depth": torch.rand(32, 32) * 4 + 0.5,
        }
        for i in range(4)
    ]
    return model, Collator(tasks)(samples)


def task_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One task's flattened gradient (0 where it does not reach: classification reads C5
    only, not the pyramid)."""
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(gs, params, strict=True)
        ]
    )


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding (summation orders differ between backward passes)."""
    return bool((a - b).norm() <= 1e-5 * b.norm())


def grads(module: MultiTaskModule, prefix: str) -> torch.Tensor:
    return torch.cat(
        [p.grad.reshape(-1) for n, p in module.model.named_parameters() if n.startswith(prefix)]
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # no trainer here
def test_a_pcgrad_student_step_differs_from_equal_weights_only_where_gradients_conflict(
    two_task_step,
):
    model, batch = two_task_step
    steps = {}
    for kind in ("equal", "pcgrad"):
        module = tiny_module(kind, copy.deepcopy(model))
        module.backward(module.training_step(batch, 0))  # as Lightning calls them
        steps[kind] = module
    # The per-task gradients of the backbone, computed apart.
    module = tiny_module("equal", copy.deepcopy(model))
    _, losses = module.model(batch.images, batch.targets)
    shared = list(module.model.backbone.parameters())
    g1, g2 = (task_grad(sum(terms.values()), shared) for terms in losses.values())
    dot = torch.dot(g1, g2)
    expected = g1 + g2
    if dot < 0:
        expected = expected - dot / g2.dot(g2) * g2 - dot / g1.dot(g1) * g1
    pcgrad, equal = grads(steps["pcgrad"], "backbone."), grads(steps["equal"], "backbone.")
    assert torch.isfinite(pcgrad).all()
    assert close(pcgrad, expected) and close(equal, g1 + g2)
    assert close(pcgrad, equal) == bool(dot >= 0)
    # Each head takes its own task's gradient, as with equal weights.
    assert close(grads(steps["pcgrad"], "heads."), grads(steps["equal"], "heads."))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pcgrad_backward_equals_the_plain_backward_unless_the_tasks_conflict(two_task_step, sign):
    # The second task's loss negated flips its gradient: one of the two signs conflicts.
    model, batch = two_task_step
    results = []
    for weighting in (None, PCGrad(["classification", "depth"])):
        m = copy.deepcopy(model)
        _, losses = m(batch.images, batch.targets)
        task = {n: sum(t.values()) for n, t in losses.items()}
        task["depth"] = sign * task["depth"]
        total = task["classification"] + task["depth"]
        shared = list(m.backbone.parameters())
        rest = list(m.heads.parameters())
        if weighting is None:
            flat = [task_grad(v, shared) for v in task.values()]
            total.backward()
        else:
            weighting.backward(total, task, shared, rest)
        results.append(m)
    plain, surgery = results
    conflict = bool(torch.dot(*flat) < 0)

    def flat_grads(params) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])

    backbone = plain.backbone.parameters(), surgery.backbone.parameters()
    assert close(*map(flat_grads, backbone)) != conflict
    assert close(*map(flat_grads, (plain.heads.parameters(), surgery.heads.parameters())))


def test_pcgrad_is_refused_with_several_processes_or_fp16_loss_scaling(two_task_step):
    tasks = ["classification", "depth"]
    for setting, why in (
        ("train.precision=16-mixed", "16-mixed precision"),
        ("train.strategy=ddp", "processes \\(DDP\\)"),
        ("train.devices=2", "2 processes"),
    ):
        with pytest.raises(ConfigError, match=rf"loss\.kind=pcgrad: .*{why}"):
            make_weighting(student("loss.kind=pcgrad", setting), tasks, {})
    make_weighting(student("loss.kind=pcgrad", "train.precision=bf16-mixed"), tasks, {})
    # A machine's devices=auto may start several processes: checked again when fitting.
    module = tiny_module("pcgrad", copy.deepcopy(two_task_step[0]))
    module._trainer = SimpleNamespace(world_size=2, precision="bf16-mixed")
    with pytest.raises(ConfigError, match=r"loss\.kind=pcgrad: .*2 processes"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(world_size=1, precision="32-true")
    module.on_fit_start()
