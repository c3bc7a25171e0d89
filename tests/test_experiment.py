"""`must run` (stages, skipping, resume, refusals) and `must report` (tables from run folders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from must.cli import main
from must.errors import ConfigError
from must.stages.experiment import StageFailed, load_experiment, run_experiment
from must.stages.report import (
    collect,
    normalised_scores,
    student_table,
    transfer_table,
    write_report,
)
from must.tasks import build_task
from tiny import TINY_BACKBONE, TINY_TRAIN_SECTION

TINY = {
    "data": {"num": 20, "render_size": 32, "image_size": 32},
    "model": {"backbone": TINY_BACKBONE},
    "train": TINY_TRAIN_SECTION,
}
TINY_STUDENT = {
    "data": {"image_size": 32},
    "model": TINY["model"],
    "train": TINY["train"],
}


def tiny_experiment(tmp_path: Path, **changes) -> Path:
    exp = {
        "name": "tiny",
        "data_cache": str(tmp_path / "data"),
        "stages": ["teachers", "label", "student", "multitask", "transfer", "report"],
        "teachers": {
            "classification": {"config": "teach_classification_cpu", "overrides": TINY},
            "segmentation": {"config": "teach_segmentation_cpu", "overrides": TINY},
        },
        "pool": {"num": 20, "render_size": 32},
        "label": {"batch_size": 8, "shard_size": 8, "workers": 0, "teacher_sets": False},
        "student": {"config": "train_student_cpu", "overrides": TINY_STUDENT},
        "multitask": {
            "config": "train_student_cpu",
            "overrides": {**TINY_STUDENT, "loss": {"kind": "equal"}},
        },
        "transfer": {
            "num": 20,
            "render_size": 32,
            "tasks": ["normals"],
            "modes": ["probe"],
            "config": {"config": "transfer_cpu", "overrides": TINY},
            "backbones": ["scratch", "student"],
        },
    }
    for key, value in changes.items():
        exp[key] = {**exp[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = load_experiment(tiny_experiment(root))
    run_experiment(cfg, root / "run", progress=False)
    return root, root / "run"


def mtimes(run: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in run.rglob("model.safetensors")}


@pytest.mark.slow
def test_a_run_goes_through_every_stage_and_writes_the_report(finished_run):
    _root, run = finished_run
    status = json.loads((run / "stages.json").read_text())
    assert [s for s in status] == [
        "teachers",
        "label",
        "student",
        "multitask",
        "transfer",
        "report",
    ]
    assert all(s["status"] == "done" for s in status.values())
    for folder in (
        "teachers/classification",
        "student",
        "multitask",
        "transfer/student/normals-probe",
    ):
        assert (run / folder / "model.safetensors").is_file()
    report = (run / "report.md").read_text()
    assert "| scratch |" in report and "| student |" in report
    assert (run / "report.html").is_file() and (run / "report" / "curves.png").is_file()


@pytest.mark.slow
def test_a_second_run_skips_every_complete_stage(finished_run, capsys):
    root, run = finished_run
    before = mtimes(run)
    cfg = load_experiment(tiny_experiment(root))
    status = run_experiment(cfg, run, progress=False)
    assert mtimes(run) == before
    for stage in ("teachers", "label", "student", "multitask", "transfer"):
        assert all(v.startswith("skipped") for v in status[stage]["jobs"].values()), stage


@pytest.mark.slow
def test_a_failed_stage_keeps_earlier_outputs_and_a_rerun_continues(finished_run, monkeypatch):
    root, run = finished_run
    import shutil

    import must.stages.teach

    shutil.rmtree(run / "transfer" / "student")
    before = mtimes(run)
    real_teach = must.stages.teach.teach

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(must.stages.teach, "teach", broken)
    cfg = load_experiment(tiny_experiment(root))
    with pytest.raises(StageFailed, match=r"stage 'transfer' failed: disk full"):
        run_experiment(cfg, run, progress=False)
    status = json.loads((run / "stages.json").read_text())
    assert status["transfer"]["status"] == "failed" and "disk full" in status["transfer"]["error"]
    assert mtimes(run) == before  # nothing computed before is lost
    monkeypatch.setattr(must.stages.teach, "teach", real_teach)
    status = run_experiment(cfg, run, progress=False, only=["transfer"])
    jobs = status["transfer"]["jobs"]
    assert jobs["scratch normals probe"].startswith("skipped")
    assert jobs["student normals probe"].startswith("done")
    assert (run / "transfer" / "student" / "normals-probe" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": ["teachers", "lable"]}, r"line \d+: stages\.1: Input should be"),
        (
            {"transfer": {"backbones": ["scratch", "teacher:depth"]}},
            r"line \d+: transfer\.backbones\.1: 'teacher:depth' names a missing teacher",
        ),
        (
            {"transfer": {"dataset": "rooms", "tasks": ["segmentation", "normals"]}},
            r"line \d+: transfer\.tasks\.1: the style 'rooms' cannot render normals",
        ),
        (
            {"transfer": {"per_task": {"normals": {"data": {"dataset": "novel_objects"}}}}},
            r"line \d+: transfer\.tasks\.\d: the style 'novel_objects' cannot render normals",
        ),
        (
            {"transfer": {"per_task": {"depth": {"data": {"num": 0}}}}},
            r"line \d+: transfer\.per_task\.depth\.data\.num: Input should be greater",
        ),
        ({"transfer": {"backbones": ["simclr"]}}, r"line \d+: .*needs the simclr: section"),
        (
            {"transfer": {"per_column": {"depth-linear": {}}}},
            r"transfer\.per_column: .*'depth-linear': a column is <task>-<mode>",
        ),
    ],
)
def test_bad_experiments_are_refused_naming_the_line(tmp_path, change, message):
    path = tiny_experiment(tmp_path, **change)
    with pytest.raises(ConfigError, match=message):
        load_experiment(path)
    # Nothing ran: no run folder was made.
    assert main(["run", str(path), "--out", str(tmp_path / "never"), "--quiet"]) == 2
    assert not (tmp_path / "never").exists()


def test_only_takes_stage_names_and_the_overrides_after_it(tmp_path, monkeypatch):
    """``--only teachers seed=3``: seed=3 is an override, not a stage to skip silently; a
    misspelt stage is refused before anything runs."""
    import must.stages.experiment as experiment

    path = tiny_experiment(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--only", "teacher", "--quiet"]) == 2
    assert not out.exists()
    ran = {}

    def record(cfg, out, progress=True, only=None):
        ran.update(seed=cfg.seed, only=only)
        return {}

    monkeypatch.setattr(experiment, "run_experiment", record)
    args = ["run", str(path), "--out", str(out), "--only", "teachers", "label", "seed=3"]
    assert main([*args, "--quiet"]) == 0
    assert ran == {"seed": 3, "only": ["teachers", "label"]}


def test_presets_are_valid_experiments():
    for name in ("quickstart", "mini", "gpu", "gpu_smoke"):
        cfg = load_experiment(name)
        assert cfg.name == name and "transfer" in cfg.stages


def test_every_detector_of_mini_has_the_same_head(tmp_path):
    """The teacher, the students, the multi-task baseline and the downstream detectors of the
    benchmark share one detection head (docs/benchmark.md, section 3)."""
    from must.stages.experiment import Experiment

    experiment = Experiment(load_experiment("mini"), tmp_path / "run", progress=False)
    configs = [
        experiment.teacher_config("detection"),
        experiment.student_config(),
        experiment.student_config(fraction=0.25),
        experiment.multitask_config(),
        *(experiment.transfer_config("scratch", "detection", m) for m in ("finetune", "probe")),
    ]
    heads = [build_task("detection", ["a"], c.model.heads["detection"]).config for c in configs]
    assert heads[0].num_convs == 2 and heads[0].box_batch_size_per_image == 16
    assert all(h == heads[0] for h in heads)


def test_per_column_overrides_reach_one_task_in_one_mode_only(tmp_path):
    from must.stages.experiment import Experiment

    per_column = {"depth-probe": {"train": {"lr": 0.123, "max_steps": 8}}}
    cfg = load_experiment(tiny_experiment(tmp_path, transfer={"per_column": per_column}))
    experiment = Experiment(cfg, tmp_path / "run", progress=False)
    probe = experiment.transfer_config("scratch", "depth", "probe").train
    assert (probe.lr, probe.max_steps) == (0.123, 8)
    for task, mode in (("depth", "finetune"), ("normals", "probe")):
        other = experiment.transfer_config("scratch", task, mode).train
        assert other.lr != 0.123 and other.max_steps != 8


def test_a_task_can_have_its_own_downstream_data(tmp_path):
    """``transfer.per_task.<task>.data`` with recipe fields gives that task its own set (mini's
    object-centric classification set); every other task keeps the transfer set."""
    from must.stages.experiment import Experiment

    own = {"dataset": "novel_objects", "num": 40, "subset": {"test": 8}}
    cfg = load_experiment(
        tiny_experiment(tmp_path, transfer={"per_task": {"classification": {"data": own}}})
    )
    experiment = Experiment(cfg, tmp_path / "run", progress=False)
    for mode in ("finetune", "probe"):
        data = experiment.transfer_config("scratch", "classification", mode).data
        assert (data.dataset, data.num, data.subset) == ("novel_objects", 40, {"test": 8})
        assert data.render_seed == cfg.transfer.render_seed  # the rest of the recipe is kept
        assert data.cache == cfg.data_cache
        other = experiment.transfer_config("scratch", "depth", mode).data
        assert (other.dataset, other.num) == (cfg.transfer.dataset, cfg.transfer.num)
    mini = Experiment(load_experiment("mini"), tmp_path / "mini", progress=False)
    assert mini.transfer_config("student", "classification", "probe").data.dataset == (
        "novel_objects"
    )


# --- the report, from fake run folders with known numbers -------------------------------------


def fake_run(root: Path, seed: int, transfer: dict[str, dict[str, float]]) -> Path:
    """A run folder with only the summaries the report reads."""
    run = root / f"seed{seed}"
    (run).mkdir(parents=True)
    (run / "experiment.yaml").write_text(yaml.safe_dump({"name": "fake", "seed": seed}))
    tasks = {
        "classification-probe": ("classification", "top1"),
        "depth-probe": ("depth", "abs_rel"),
    }
    for backbone, values in transfer.items():
        for column, value in values.items():
            task, metric = tasks[column]
            folder = run / "transfer" / backbone / column
            folder.mkdir(parents=True)
            info = {"config": {"task": task}, "test": {task: {metric: value}}}
            (folder / "summary.json").write_text(json.dumps({"info": info}))
    for task, metric, teacher, student in (
        ("classification", "top1", 0.8, 0.6),
        ("depth", "abs_rel", 0.2, 0.25),
    ):
        for name, value in (("teachers/" + task, teacher), ("student", student)):
            folder = run / name
            folder.mkdir(parents=True, exist_ok=True)
            summary = folder / "summary.json"
            info = json.loads(summary.read_text())["info"] if summary.exists() else {"test": {}}
            info["test"][task] = {metric: value}
            summary.write_text(json.dumps({"info": info}))
    return run


def test_normalised_score_is_zero_for_scratch_and_one_for_the_best(tmp_path):
    # classification top1 (higher is better): scratch 0.2, teacher 0.4, student 0.6;
    # depth abs_rel (lower is better): scratch 0.30, teacher 0.25, student 0.20.
    run = fake_run(
        tmp_path,
        0,
        {
            "scratch": {"classification-probe": 0.2, "depth-probe": 0.30},
            "teacher_depth": {"classification-probe": 0.4, "depth-probe": 0.25},
            "student": {"classification-probe": 0.6, "depth-probe": 0.20},
        },
    )
    scores = normalised_scores(collect(run)["transfer"])
    assert scores["scratch"] == {"classification-probe": 0.0, "depth-probe": 0.0}
    assert scores["student"] == pytest.approx({"classification-probe": 1.0, "depth-probe": 1.0})
    assert scores["teacher_depth"] == pytest.approx(
        {"classification-probe": 0.5, "depth-probe": 0.5}
    )


def test_transfer_table_gives_mean_and_spread_over_seeds(tmp_path):
    runs = [
        fake_run(
            tmp_path,
            0,
            {"scratch": {"classification-probe": 0.2}, "student": {"classification-probe": 0.6}},
        ),
        fake_run(
            tmp_path,
            1,
            {"scratch": {"classification-probe": 0.4}, "student": {"classification-probe": 0.8}},
        ),
    ]
    header, rows = transfer_table([collect(r) for r in runs])
    assert header == ["backbone", "classification-probe top1 ↑", "mean score (probe)"]
    # mean of 0.6 and 0.8, sample standard deviation sqrt(0.02) = 0.141
    assert rows == [
        ["scratch", "0.300 ± 0.141", "0.000 ± 0.000"],
        ["student", "0.700 ± 0.141", "1.000 ± 0.000"],
    ]
    header, rows = student_table([collect(r) for r in runs])
    # Relative to the teacher, above 1 = better: 0.6 / 0.8 for top1, 0.2 / 0.25 for abs_rel.
    assert rows[0][:4] == ["classification", "top1 ↑", "0.800 ± 0.000", "0.600 ± 0.000"]
    assert rows[0][-1] == "0.750 ± 0.000" and rows[1][-1] == "0.800 ± 0.000"
    md = write_report(runs, tmp_path / "merged")
    text = md.read_text()
    assert "seeds 0, 1" in text and "| student | 0.700 ± 0.141 | 1.000 ± 0.000 |" in text
    assert "best (or tied best) backbone on 1 of 1 columns" in text
    assert "Mean normalised score, probe, best first: student 1.000, scratch 0.000." in text


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        write_report([tmp_path], tmp_path)


@pytest.mark.slow
def test_a_changed_experiment_never_reuses_a_model_trained_with_another_config(finished_run):
    root, run = finished_run
    changed = {**TINY, "train": {**TINY["train"], "lr": 0.5}}
    path = tiny_experiment(
        root,
        teachers={
            "classification": {"config": "teach_classification_cpu", "overrides": changed},
            "segmentation": {"config": "teach_segmentation_cpu", "overrides": TINY},
        },
    )
    before = mtimes(run)
    with pytest.raises(StageFailed, match=r"stage 'teachers' failed: .*another config"):
        run_experiment(load_experiment(path), run, progress=False)
    assert mtimes(run) == before


def test_transfer_waits_for_extra_students_only_when_their_stage_runs(tmp_path):
    from must.stages.experiment import Experiment

    path = tiny_experiment(
        tmp_path, stages=["teachers", "label", "student", "scaling", "transfer"], scaling=[0.5]
    )
    cfg = load_experiment(path)

    def backbones(stages):
        jobs = Experiment(cfg, tmp_path / "run", False, stages).jobs("transfer")
        return sorted({j.name.split()[0] for j in jobs})

    assert backbones(["transfer"]) == ["scratch", "student"]
    assert backbones(["scaling", "transfer"]) == ["scratch", "student", "student_pool50"]
    (tmp_path / "run" / "student_pool50").mkdir(parents=True)
    (tmp_path / "run" / "student_pool50" / "summary.json").write_text("{}")
    assert backbones(["transfer"]) == ["scratch", "student", "student_pool50"]


def test_extra_students_get_their_own_tables_on_the_main_scale(tmp_path):
    run = fake_run(
        tmp_path,
        0,
        {
            "scratch": {"classification-probe": 0.2},
            "multitask": {"classification-probe": 0.3},
            "student": {"classification-probe": 0.4},
            "student_pool25": {"classification-probe": 0.3},
            "student_from_multitask": {"classification-probe": 0.6},
        },
    )
    data = [collect(run)]
    # The main comparison's best is the student (0.4), not the extra student (0.6) ...
    scores = normalised_scores(data[0]["transfer"])
    assert scores["student"]["classification-probe"] == pytest.approx(1.0)
    assert scores["student_from_multitask"]["classification-probe"] == pytest.approx(2.0)
    _, rows = transfer_table(data)
    assert [r[0] for r in rows] == ["scratch", "multitask", "student"]
    text = write_report([run], tmp_path / "r").read_text()
    assert (
        "## More unlabelled data (scaling)" in text and "## Improving a strong checkpoint" in text
    )
    assert "| student_pool25 | 0.300 | 0.500 |" in text
    assert "| student_from_multitask | 0.600 | 2.000 |" in text
    # A second seed without the extras changes the main table, not the extras' comparison.
    other = fake_run(
        tmp_path,
        1,
        {"scratch": {"classification-probe": 0.2}, "student": {"classification-probe": 0.6}},
    )
    text = write_report([run, other], tmp_path / "r2").read_text()
    main, extras = text.split("## More unlabelled data (scaling)")
    assert "| student | 0.500 ± 0.141 | 1.000 ± 0.000 |" in main
    assert extras.count("| student | 0.400 | 1.000 |") == 2
