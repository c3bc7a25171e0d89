"""The paired bootstrap of ``must report`` (``must.stats`` and the statistics of the transfer
table) on synthetic run folders whose per-image test records are written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from must.records import save_records
from must.stages.report import write_report
from must.stats import (
    average_ranks,
    bootstrap_weights,
    error,
    interval,
    relative_error_reduction,
    stable_seed,
)

# --- synthetic runs with records written by must.records ------------------------------------


def write_records(path: Path, task: str, metric: str, keys: list[str], fields: dict) -> None:
    """``fields``: {field: per-image arrays}, as a task's ``image_records`` gives them."""
    records = [
        dict(zip(fields, arrays, strict=True)) for arrays in zip(*fields.values(), strict=True)
    ]
    save_records(path, task, metric, keys, records)


METRICS = {"classification": "top1", "depth": "abs_rel"}


def fake_run(root: Path, seed: int, columns: dict, records: bool = True, keys=None) -> Path:
    """A run folder of ``must run`` with transfer summaries and test records: ``columns`` is
    {column: {backbone: per-image values}} (classification: 0/1 correct; depth: per-image
    abs_rel with one pixel each)."""
    run = root / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "experiment.yaml").write_text(yaml.safe_dump({"name": "fake", "seed": seed}))
    for column, backbones in columns.items():
        task = column.rsplit("-", 1)[0]
        metric = METRICS[task]
        for backbone, values in backbones.items():
            values = np.asarray(values)
            folder = run / "transfer" / backbone / column
            folder.mkdir(parents=True)
            info = {"config": {"task": task}, "test": {task: {metric: float(values.mean())}}}
            (folder / "summary.json").write_text(json.dumps({"info": info}))
            if not records:
                continue
            names = keys(backbone) if keys else [f"img{i:05d}" for i in range(len(values))]
            if task == "classification":
                fields = {"correct1": [np.array([v], dtype=np.int64) for v in values]}
            else:
                fields = {
                    "abs_rel_sum": [np.array([v], dtype=np.float64) for v in values],
                    "count": [np.ones(1) for _ in values],
                }
            write_records(folder / "test_records" / f"{task}.npz", task, metric, names, fields)
    return run


def correct(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    return (rng.random(n) < p).astype(np.int64)


def three_backbone_runs(root: Path, n: int = 400) -> tuple[list[Path], dict]:
    """Two seeds of one probe column: the student right on ~70% of the images, scratch on
    ~50% (worse), multitask identical to the student, simclr on ~90% (better)."""
    rng = np.random.default_rng(0)
    runs, arrays = [], {}
    for seed in (0, 1):
        student = correct(rng, n, 0.7)
        arrays[seed] = {
            "scratch": correct(rng, n, 0.5),
            "multitask": student.copy(),
            "simclr": correct(rng, n, 0.9),
            "student": student,
        }
        runs.append(fake_run(root, seed, {"classification-probe": arrays[seed]}))
    return runs, arrays


# --- must.stats -----------------------------------------------------------------------------


def test_bootstrap_weights_are_multinomial_counts_reproducible_from_the_seed():
    w = bootstrap_weights(50, 4000, seed=7)
    assert w.shape == (4000, 50) and np.all(w.sum(1) == 50) and np.all(w == np.round(w))
    assert np.array_equal(w, bootstrap_weights(50, 4000, seed=7))
    assert not np.array_equal(w, bootstrap_weights(50, 4000, seed=8))
    # Multinomial(n, 1/n): each count has mean 1 and variance n * (1/n) * (1 - 1/n) = 0.98.
    assert w.mean() == pytest.approx(1.0)
    assert w.var(0).mean() == pytest.approx(0.98, rel=0.05)
    # CRC-32's published check value: the same seed in every process (unlike hash()).
    assert stable_seed("123456789") == 0xCBF43926


def test_percentile_interval_and_average_ranks_by_hand():
    assert interval(np.arange(1001) / 1000) == pytest.approx((0.025, 0.975))
    assert interval(np.arange(101), level=0.5) == pytest.approx((25.0, 75.0))
    assert all(math.isnan(x) for x in interval(np.array([0.1, np.nan])))
    # 0.9 twice shares ranks 1 and 2; columns are independent resamples.
    values = np.array([[0.9, 0.1], [0.5, 0.2], [0.9, 0.3], [0.1, 0.4]])
    assert average_ranks(values, axis=0).tolist() == [
        [1.5, 4.0],
        [3.0, 3.0],
        [1.5, 2.0],
        [4.0, 1.0],
    ]
    assert average_ranks(np.array([2.0, 2.0, 2.0])).tolist() == [2.0, 2.0, 2.0]


def test_error_and_relative_error_reduction_by_hand():
    assert error(np.array([0.8]), True) == pytest.approx([0.2])
    assert error(np.array([0.3]), False) == pytest.approx([0.3])
    # scratch error 0.5, model error 0.2: 60% of the error removed; 0.6: 20% more error.
    out = relative_error_reduction(np.array([0.2, 0.6, 0.5]), np.array([0.5, 0.5, 0.5]))
    assert out == pytest.approx([0.6, -0.2, 0.0])
    assert np.isnan(relative_error_reduction(np.array([0.1]), np.array([0.0]))[0])


# --- the report -----------------------------------------------------------------------------


def test_win_tie_loss_and_aggregates_of_a_paired_column(tmp_path):
    runs, arrays = three_backbone_runs(tmp_path)
    md = write_report(runs, tmp_path / "r").read_text()
    stats = json.loads((tmp_path / "r" / "report.json").read_text())["statistics"]
    col = stats["columns"]["classification-probe"]
    assert col["n_test_images"] == 400 and col["higher_is_better"] and col["no_statistics"] is None
    assert col["metric_per_seed"]["scratch"]["1"] == pytest.approx(arrays[1]["scratch"].mean())
    minus = col["student_minus"]
    assert [minus[b]["verdict"] for b in ("scratch", "multitask", "simclr")] == [
        "win",
        "tie",
        "loss",
    ]
    # The point difference is the mean over seeds of the plain accuracy differences.
    by_hand = [arrays[s]["student"].mean() - arrays[s]["scratch"].mean() for s in (0, 1)]
    assert minus["scratch"]["difference"] == pytest.approx(np.mean(by_hand))
    assert [p["difference"] for p in minus["scratch"]["per_seed"]] == pytest.approx(by_hand)
    assert minus["scratch"]["sd"] == pytest.approx(np.std(by_hand, ddof=1))
    assert minus["scratch"]["interval"][0] > 0 and minus["simclr"]["interval"][1] < 0
    # The identical backbone differs by 0 under every resample.
    assert minus["multitask"]["interval"] == [0.0, 0.0]
    assert minus["multitask"]["difference"] == 0.0
    # The width of a paired difference is that of the mean of the per-image differences:
    # 2 * 1.96 * sd / sqrt(n) per seed, the bootstrap to within Monte Carlo error.
    for s, p in zip((0, 1), minus["scratch"]["per_seed"], strict=True):
        diff = arrays[s]["student"] - arrays[s]["scratch"]
        expected = 2 * 1.96 * diff.std() / math.sqrt(len(diff))
        assert p["interval"][1] - p["interval"][0] == pytest.approx(expected, rel=0.15)
    agg = stats["aggregates"]["probe"]["backbones"]
    # Ranks by the seed-mean: simclr 1, student and multitask tied at 2.5, scratch last.
    assert {b: a["mean_rank"] for b, a in agg.items()} == {
        "scratch": 4.0,
        "multitask": 2.5,
        "simclr": 1.0,
        "student": 2.5,
    }
    assert agg["scratch"]["mean_rank_interval"] == [4.0, 4.0]  # dominated under every resample
    e = {b: 1 - np.mean([arrays[s][b].mean() for s in (0, 1)]) for b in arrays[0]}
    assert agg["student"]["relative_error_reduction"] == pytest.approx(
        (e["scratch"] - e["student"]) / e["scratch"]
    )
    assert agg["student"]["relative_error_reduction_interval"][0] > 0
    assert agg["scratch"]["relative_error_reduction"] == 0.0
    assert (agg["scratch"]["wins"], agg["scratch"]["ties"], agg["scratch"]["losses"]) == (1, 0, 0)
    assert agg["simclr"]["student_better"]["verdict"] == "worse"
    # The report: the headline first, the sentence, the difference cells.
    assert md.index("## Headline") < md.index("## Transfer to the downstream tasks")
    assert (
        "**probe**, on the aggregate (the mean relative error reduction over scratch, paired 95% "
        "intervals): the student is significantly better than scratch; significantly worse "
        "than simclr; undecided against multitask." in md
    )
    low, high = minus["scratch"]["interval"]
    assert f"| scratch | {np.mean(by_hand):+.3f} [{low:+.3f}, {high:+.3f}] win |" in md
    assert "| multitask | +0.000 [+0.000, +0.000] tie |" in md
    assert "## Test images and half-widths" in md and "### Per seed" in md


def test_the_resamples_are_the_same_for_every_run_of_a_column_and_stable(tmp_path):
    runs, _ = three_backbone_runs(tmp_path)
    write_report(runs, tmp_path / "a")
    write_report(runs, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "report.json").read_text())["statistics"]
    b = json.loads((tmp_path / "b" / "report.json").read_text())["statistics"]
    assert a == b
    # Shared weights: the student and its identical twin have identical resampled metrics,
    # hence identical half-widths (independent draws would differ).
    hw = a["columns"]["classification-probe"]["half_width"]
    assert hw["student"] == hw["multitask"]


def test_the_interval_of_a_metric_narrows_as_one_over_the_square_root_of_the_images(tmp_path):
    rng = np.random.default_rng(1)
    widths = {}
    for n in (500, 2000):
        values = {"student": correct(rng, n, 0.7), "scratch": correct(rng, n, 0.5)}
        run = fake_run(tmp_path / str(n), 0, {"classification-probe": values})
        write_report([run], tmp_path / f"r{n}")
        stats = json.loads((tmp_path / f"r{n}" / "report.json").read_text())["statistics"]
        widths[n] = stats["columns"]["classification-probe"]["half_width"]["student"]
        p = values["student"].mean()
        # The binomial standard error: 1.96 * sqrt(p (1 - p) / n).
        assert widths[n] == pytest.approx(1.96 * math.sqrt(p * (1 - p) / n), rel=0.15)
    assert widths[500] / widths[2000] == pytest.approx(2.0, rel=0.15)


def test_lower_is_better_metrics_are_signed_so_positive_means_the_student_is_better(tmp_path):
    rng = np.random.default_rng(2)
    n = 300
    values = {
        "scratch": rng.uniform(0.2, 0.4, n),  # abs_rel ~0.3: worse
        "student": rng.uniform(0.1, 0.3, n),  # abs_rel ~0.2
    }
    run = fake_run(tmp_path, 0, {"depth-finetune": values})
    write_report([run], tmp_path / "r")
    stats = json.loads((tmp_path / "r" / "report.json").read_text())["statistics"]
    minus = stats["columns"]["depth-finetune"]["student_minus"]["scratch"]
    assert minus["difference"] == pytest.approx(values["scratch"].mean() - values["student"].mean())
    assert minus["verdict"] == "win"
    # Error of a lower-is-better metric is the metric: (0.3 - 0.2) / 0.3 ≈ 1/3.
    rer = stats["aggregates"]["finetune"]["backbones"]["student"]["relative_error_reduction"]
    assert rer == pytest.approx(1 - values["student"].mean() / values["scratch"].mean())


def test_a_column_whose_best_is_not_significantly_above_scratch_leaves_the_score(tmp_path):
    rng = np.random.default_rng(3)
    n = 400
    scratch = correct(rng, n, 0.6)
    close = scratch.copy()
    # 10 images won and 8 lost against scratch: best - scratch = 0.005, well inside the noise.
    wrong, right = np.flatnonzero(scratch == 0), np.flatnonzero(scratch == 1)
    close[wrong[:10]], close[right[:8]] = 1, 0
    columns = {
        "classification-probe": {"scratch": scratch, "student": correct(rng, n, 0.9)},
        "classification-finetune": {"scratch": scratch, "student": close},
    }
    run = fake_run(tmp_path, 0, columns)
    md = write_report([run], tmp_path / "r").read_text()
    stats = json.loads((tmp_path / "r" / "report.json").read_text())["statistics"]
    left = stats["normalised_score_left_out"]
    assert list(left) == ["classification-finetune"]
    assert left["classification-finetune"].startswith("best (student) − scratch +0.005 [")
    assert "Left out of the normalised score: classification-finetune (best (student)" in md
    # The finetune score has no column left; the probe one is there as before.
    assert "Mean normalised score, probe, best first: student 1.000, scratch 0.000." in md
    assert "Mean normalised score, finetune" not in md


def test_columns_without_records_or_with_different_images_get_no_statistics(tmp_path):
    rng = np.random.default_rng(4)
    n = 100
    run = fake_run(
        tmp_path / "a",
        0,
        {
            "classification-probe": {
                "scratch": correct(rng, n, 0.5),
                "student": correct(rng, n, 0.7),
            }
        },
        records=False,
    )
    md = write_report([run], tmp_path / "r").read_text()
    assert "## Headline" not in md and "Student minus each backbone" not in md
    assert (
        "classification-probe: no per-image test records for scratch (seed 0), student (seed 0)"
        in md
    )
    assert "| student | 0.7" in md or "| student | 0.6" in md  # the metric table as before
    # Records of other images for one backbone: no statistics, and the report says why.
    other = fake_run(
        tmp_path / "b",
        0,
        {
            "classification-probe": {
                "scratch": correct(rng, n, 0.5),
                "student": correct(rng, n, 0.7),
            }
        },
        keys=lambda b: [f"{b}{i}" for i in range(n)],
    )
    md = write_report([other], tmp_path / "r2").read_text()
    assert "tested on different images" in md and "0 in common" in md


def test_records_that_do_not_reproduce_the_summary_are_refused(tmp_path):
    rng = np.random.default_rng(5)
    run = fake_run(
        tmp_path,
        0,
        {
            "classification-probe": {
                "scratch": correct(rng, 50, 0.5),
                "student": correct(rng, 50, 0.7),
            }
        },
    )
    summary = run / "transfer" / "student" / "classification-probe" / "summary.json"
    payload = json.loads(summary.read_text())
    payload["info"]["test"]["classification"]["top1"] = 0.123
    summary.write_text(json.dumps(payload))
    md = write_report([run], tmp_path / "r").read_text()
    assert "the test records of student (seed 0) give top1" in md and "its summary 0.123" in md
    # Not even the runs read before the mismatch are compared.
    assert "## Headline" not in md and "Student minus each backbone" not in md
    stats = json.loads((tmp_path / "r" / "report.json").read_text())["statistics"]
    assert stats["columns"]["classification-probe"]["n_test_images"] is None
    assert stats["aggregates"] == {}


def test_extra_students_get_the_paired_comparison(tmp_path):
    rng = np.random.default_rng(6)
    n = 400
    student = correct(rng, n, 0.6)
    columns = {
        "classification-probe": {
            "scratch": correct(rng, n, 0.4),
            "multitask": correct(rng, n, 0.5),
            "student": student,
            "student_pool25": correct(rng, n, 0.3),
            "student_from_multitask": correct(rng, n, 0.8),
        }
    }
    run = fake_run(tmp_path, 0, columns)
    md = write_report([run], tmp_path / "r").read_text()
    stats = json.loads((tmp_path / "r" / "report.json").read_text())["statistics"]
    comparisons = stats["columns"]["classification-probe"]["comparisons"]
    assert comparisons["student_pool25 - student"]["verdict"] == "loss"
    assert comparisons["student_from_multitask - multitask"]["verdict"] == "win"
    # Extras are not part of the main comparison or its aggregates.
    assert set(stats["aggregates"]["probe"]["backbones"]) == {"scratch", "multitask", "student"}
    scaling = md.split("## More unlabelled data (scaling)")[1].split("\n## ")[0]
    assert "| student_pool25 − student |" in scaling and " loss |" in scaling
    strong = md.split("## Improving a strong checkpoint")[1].split("\n## ")[0]
    assert "| student_from_multitask − multitask |" in strong and " win |" in strong


def test_downstream_validation_curves_have_a_panel_per_column(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(7)
    run = fake_run(
        tmp_path,
        0,
        {
            c: {"scratch": correct(rng, 20, 0.5), "student": correct(rng, 20, 0.7)}
            for c in ("classification-probe", "classification-finetune")
        },
    )
    for folder in (run / "transfer").glob("*/*"):
        (folder / "logs").mkdir()
        (folder / "logs" / "metrics.csv").write_text(
            "epoch,step,train/loss,val/classification/top1\n0,10,1.0,\n0,10,,0.3\n1,20,,0.5\n"
        )
    md = write_report([run], tmp_path / "r").read_text()
    assert "## Downstream validation curves" in md
    assert "![downstream validation curves](report/transfer_curves.png)" in md
    # Two panels side by side: 2 * 3.8 inches at 100 dpi (one panel would be 380 px).
    with Image.open(tmp_path / "r" / "report" / "transfer_curves.png") as image:
        assert image.size[0] == 760


# --- convergence of the downstream runs ------------------------------------------------------


def test_a_curve_still_rises_only_when_its_last_quarter_brings_the_best_by_a_margin():
    from must.stages.report import still_rising

    steps = [25, 50, 75, 100]
    assert still_rising(list(zip(steps, [0.2, 0.3, 0.4, 0.5], strict=True)), higher=True)
    # Settled: the last quarter gains under 1% of the value at three quarters.
    assert not still_rising(list(zip(steps, [0.2, 0.4, 0.5, 0.504], strict=True)), True)
    # Peaked early and fell (over-fitting): the schedule was long enough.
    assert not still_rising(list(zip(steps, [0.2, 0.5, 0.45, 0.48], strict=True)), True)
    # Lower is better: an error still falling, and one that has settled.
    assert still_rising(list(zip(steps, [0.5, 0.4, 0.3, 0.25], strict=True)), False)
    assert not still_rising(list(zip(steps, [0.5, 0.4, 0.3, 0.301], strict=True)), False)
    assert not still_rising([(100, 0.5)], True)


def test_the_report_names_the_runs_whose_curves_still_rise(tmp_path):
    from must.stages.report import rising_curves

    def transfer_run(run: Path, backbone: str, column: str, task: str, values: list[float]):
        folder = run / "transfer" / backbone / column
        (folder / "logs").mkdir(parents=True)
        info = {"config": {"task": task}, "test": {}}
        (folder / "summary.json").write_text(json.dumps({"info": info}))
        metric = {"depth": "abs_rel", "classification": "top1"}[task]
        rows = [f"{25 * (i + 1) - 1},{v}" for i, v in enumerate(values)]
        (folder / "logs" / "metrics.csv").write_text(
            f"step,val/{task}/{metric}\n" + "\n".join(rows) + "\n"
        )

    runs = [tmp_path / "seed0", tmp_path / "seed1"]
    for seed, run in enumerate(runs):
        transfer_run(run, "scratch", "depth-probe", "depth", [0.5, 0.4, 0.3, 0.2 + seed * 0.1])
        transfer_run(run, "student", "depth-probe", "depth", [0.3, 0.25, 0.2, 0.2])
        transfer_run(run, "student", "classification-probe", "classification", [0.2, 0.3, 0.4, 0.6])
    assert rising_curves(runs, [0, 1]) == {
        "depth-probe": {"scratch": [0]},  # seed 1's last value equals three quarters'
        "classification-probe": {"student": [0, 1]},
    }
