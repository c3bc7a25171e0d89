"""``must report``: one or more run folders of ``must run`` (one per seed) -> ``report.md``,
``report.html`` and ``report.json`` with the headline (mean rank and relative error reduction
over scratch per mode, with bootstrap intervals), the transfer table (mean ± spread over seeds,
normalised transfer score), the student's paired differences against every backbone on the
same test images (docs/experiments.md, "How differences are measured"), the student against
its teachers, loss weights and data, training and downstream validation curves, and example
predictions next to the ground truth.

Normalised transfer score of a backbone on one downstream task and mode, within one seed:
``(m - scratch) / (best - scratch)`` where ``best`` is the best backbone of that seed, with
lower-is-better metrics negated first: 0 is training from scratch, 1 the best backbone. The
headline is its mean over the downstream tasks.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from must.checkpoint import SUMMARY_FILE
from must.errors import ConfigError, DataError
from must.stats import (
    average_ranks,
    bootstrap_weights,
    error,
    interval,
    relative_error_reduction,
    stable_seed,
)
from must.summary import RunInfo, run_info
from must.tasks import TASK_TYPES

STUDENTS = ("student", "multitask", "student_from_multitask")
RECORDS_DIR = "test_records"  # a transfer run's per-image test records: <task>.npz
RESAMPLES = 2000  # bootstrap resamples of the test images, per column
LEVEL = 0.95  # of every interval
VERDICTS = ("win", "tie", "loss")  # of the student against a backbone on one column


def primary(task: str) -> tuple[str, bool]:
    """(primary metric, higher is better) of a task."""
    kind = TASK_TYPES[task]
    return kind.primary_metric, kind.higher_is_better


def _read_info(folder: Path) -> RunInfo | None:
    """The run info of a finished run folder (None when it has no summary yet)."""
    file = folder / SUMMARY_FILE
    return run_info(json.loads(file.read_text()), file) if file.is_file() else None


def collect(run: str | Path) -> dict[str, Any]:
    """Everything the report needs from one run folder (missing parts are simply absent)."""
    run = Path(run)
    if not (run / "experiment.yaml").is_file():
        raise ConfigError(f"{run}: not a run folder of must run (no experiment.yaml)")
    experiment = yaml.safe_load((run / "experiment.yaml").read_text())
    out: dict[str, Any] = {
        "run": str(run),
        "seed": experiment.get("seed", 0),
        "experiment": experiment,
        "teachers": {},
        "students": {},
        "transfer": {},
    }
    for folder in sorted((run / "teachers").glob("*")):
        info = _read_info(folder)
        if info:
            out["teachers"][folder.name] = info
    candidates = [run / n for n in STUDENTS] + sorted(run.glob("student_pool*"))
    for folder in candidates:
        info = _read_info(folder)
        if info:
            out["students"][folder.name] = info
    for folder in sorted((run / "transfer").glob("*/*")):
        info = _read_info(folder)
        if info:
            task = info.config["task"]
            metric, _ = primary(task)
            value = info.test.get(task, {}).get(metric)
            records = folder / RECORDS_DIR / f"{task}.npz"
            out["transfer"].setdefault(folder.parent.name, {})[folder.name] = {
                "task": task,
                "metric": metric,
                "value": value,
                "test": info.test.get(task, {}),
                "folder": str(folder),
                "records": str(records) if records.is_file() else None,
            }
    status = run / "stages.json"
    out["stages"] = json.loads(status.read_text()) if status.is_file() else {}
    return out


def is_extra(backbone: str) -> bool:
    """The students of the scaling and strong-checkpoint experiments: reported beside the main
    comparison, not part of it (they do not set its "best")."""
    return backbone.startswith(("student_pool", "student_from_"))


def normalised_scores(
    transfer: dict[str, dict[str, dict]], left_out: Collection[str] = ()
) -> dict[str, dict[str, float]]:
    """Per backbone, per column (task-mode): the normalised transfer score of one seed. The
    best is that of the main backbones; extra students are scored on the same scale (and
    may exceed 1). Columns in ``left_out`` get no score."""
    columns = sorted({c for cols in transfer.values() for c in cols} - set(left_out))
    scores: dict[str, dict[str, float]] = {b: {} for b in transfer}
    for column in columns:
        values = {}
        for backbone, cols in transfer.items():
            entry = cols.get(column)
            if entry and entry["value"] is not None:
                _, higher = primary(entry["task"])
                values[backbone] = entry["value"] if higher else -entry["value"]
        if "scratch" not in values:
            continue
        best = max(v for b, v in values.items() if not is_extra(b))
        span = best - values["scratch"]
        for backbone, v in values.items():
            scores[backbone][column] = (v - values["scratch"]) / span if span > 0 else 0.0
    return scores


def _mean_spread(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def ordered(backbones: Collection[str]) -> list[str]:
    """Backbones in the report's order: scratch, teachers, SimCLR, multi-task, student, then
    the rest (extra students) by name."""
    order = {"scratch": 0, "simclr": 2, "multitask": 3, "student": 4}
    return sorted(backbones, key=lambda b: (order.get(b, 1 if b.startswith("teacher") else 5), b))


def transfer_table(
    runs: list[dict[str, Any]], rows_of: list[str] | None = None, left_out: Collection[str] = ()
) -> tuple[list[str], list[list[str]]]:
    """Rows: backbones (``rows_of``, default the main ones); columns: task-mode primary
    metrics, then the mean normalised score per mode (over the columns not ``left_out``);
    cells: mean ± standard deviation over the runs (seeds)."""
    backbones: list[str] = []
    for r in runs:
        backbones += [b for b in r["transfer"] if b not in backbones]
    if rows_of is None:
        backbones = [b for b in backbones if not is_extra(b)]
    else:
        backbones = [b for b in rows_of if b in backbones]
    if rows_of is None:
        backbones = ordered(backbones)
    columns = sorted({c for r in runs for cols in r["transfer"].values() for c in cols})
    modes = sorted({c.rsplit("-", 1)[1] for c in columns})
    per_run_scores = [normalised_scores(r["transfer"], left_out) for r in runs]
    header = ["backbone"]
    for c in columns:
        task = c.rsplit("-", 1)[0]
        metric, higher = primary(task)
        header.append(f"{c} {metric} {'↑' if higher else '↓'}")
    header += [f"mean score ({m})" for m in modes]
    rows = []
    for b in backbones:
        row = [b]
        for c in columns:
            row.append(
                _mean_spread(
                    [r["transfer"].get(b, {}).get(c, {}).get("value") for r in runs]  # type: ignore[misc]
                )
            )
        for m in modes:
            row.append(_mean_spread(per_seed_mean_score(per_run_scores, b, m)))
        rows.append(row)
    return header, rows


def per_seed_mean_score(
    per_run_scores: list[dict[str, dict[str, float]]], backbone: str, mode: str
) -> list[float]:
    """The backbone's normalised score averaged over the tasks of one mode, per seed."""
    means = []
    for scores in per_run_scores:
        s = [v for c, v in scores.get(backbone, {}).items() if c.endswith(f"-{mode}")]
        if s:
            means.append(statistics.fmean(s))
    return means


def score_ranking(
    runs: list[dict[str, Any]], left_out: Collection[str] = ()
) -> dict[str, list[tuple[str, float]]]:
    """Per mode, backbones by mean normalised score over tasks and seeds, best first."""
    per_run_scores = [normalised_scores(r["transfer"], left_out) for r in runs]
    backbones = {b for r in runs for b in r["transfer"] if not is_extra(b)}
    columns = {c for r in runs for cols in r["transfer"].values() for c in cols}
    out = {}
    for m in sorted({c.rsplit("-", 1)[1] for c in columns}):
        means = {b: per_seed_mean_score(per_run_scores, b, m) for b in backbones}
        ranked = [(b, statistics.fmean(v)) for b, v in means.items() if v]
        out[m] = sorted(ranked, key=lambda x: -x[1])
    return out


def wins(runs: list[dict[str, Any]], backbone: str = "student") -> dict[str, Any]:
    """On how many task-mode columns the backbone's mean is at least every other's."""
    columns = sorted({c for r in runs for cols in r["transfer"].values() for c in cols})
    out = {"columns": len(columns), "best_on": []}
    for c in columns:
        task = c.rsplit("-", 1)[0]
        _, higher = primary(task)
        means = {}
        for r in runs:
            for b, cols in r["transfer"].items():
                v = cols.get(c, {}).get("value")
                if v is not None and not is_extra(b):
                    means.setdefault(b, []).append(v if higher else -v)
        means = {b: statistics.fmean(v) for b, v in means.items()}
        if backbone in means and means[backbone] >= max(means.values()):
            out["best_on"].append(c)
    return out


# --- Paired bootstrap over test images -------------------------------------------------------
#
# Within one column (task-mode) every backbone and seed is tested on the same images. One set
# of resample weights per column, shared by every run of it, gives m[b, s, r] (backbone b, seed
# s, resample r; r = 0 is the test set itself, unit weights). Differences are taken resample by
# resample, so the luck of the images drawn, common to both models, cancels out.


@dataclass
class ColumnStats:
    """The resampled metrics of one column, or why it has none (``reason``)."""

    column: str
    task: str
    metric: str
    higher_is_better: bool
    seeds: dict[int, Any]  # run index -> its seed
    n_images: int = 0
    # backbone -> run index -> (1 + resamples,) metric values; [0] with unit weights
    values: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    reason: str | None = None

    @property
    def sign(self) -> float:
        """+1 or -1: a metric times the sign is larger when better."""
        return 1.0 if self.higher_is_better else -1.0

    def seed_mean(self, backbone: str) -> np.ndarray:
        """(1 + resamples,) the backbone's metric averaged over its seeds."""
        return np.mean(list(self.values[backbone].values()), axis=0)


def column_stats(
    data: list[dict[str, Any]], column: str, resamples: int = RESAMPLES
) -> ColumnStats:
    """Every run of ``column`` (all backbones and seeds) under the same ``resamples``
    bootstrap draws of its test images, from the runs' per-image test records. A column
    with a run lacking records, runs tested on different images, or records that do not
    reproduce a run's test metric gets no values and a ``reason``."""
    every = {
        (i, b): e
        for i, d in enumerate(data)
        for b, cols in d["transfer"].items()
        if (e := cols.get(column))
    }
    task = next(iter(every.values()))["task"]
    metric, higher = primary(task)
    stats = ColumnStats(column, task, metric, higher, {i: d["seed"] for i, d in enumerate(data)})
    entries = {run: e for run, e in every.items() if e["value"] is not None}
    if not entries:
        stats.reason = f"no run has a test {metric}"
        return stats

    def name(run: tuple[int, str]) -> str:
        return f"{run[1]} (seed {data[run[0]]['seed']})"

    missing = [name(run) for run, e in entries.items() if not e.get("records")]
    if missing:
        stats.reason = "no per-image test records for " + ", ".join(missing)
        return stats
    from must.records import load_records  # the records are read only when a column has them

    try:
        sets = {run: load_records(e["records"]) for run, e in entries.items()}
    except DataError as err:
        stats.reason = f"unreadable test records: {err}"
        return stats
    first, keys = next(iter(sets)), list(next(iter(sets.values())).keys)
    for run, rs in sets.items():
        if len(rs.keys) != len(keys) or set(rs.keys) != set(keys):
            stats.reason = (
                f"its runs were tested on different images: {name(first)} on {len(keys)}, "
                f"{name(run)} on {len(rs.keys)}, {len(set(rs.keys) & set(keys))} in common"
            )
            return stats
    n = len(keys)
    weights = np.vstack([np.ones((1, n)), bootstrap_weights(n, resamples, stable_seed(column))])
    values_of: dict[str, dict[int, np.ndarray]] = {}
    try:
        metric_of = TASK_TYPES[task].records_metric
        for run, rs in sets.items():
            values = np.asarray(metric_of(rs.subset(keys).records)(weights), dtype=np.float64)
            value = entries[run]["value"]
            # Records of another model (a stale folder) would compare the wrong runs.
            if not math.isclose(values[0], value, rel_tol=1e-3, abs_tol=1e-6):
                stats.reason = (
                    f"the test records of {name(run)} give {metric} {values[0]:.6g}, its "
                    f"summary {value:.6g}"
                )
                return stats
            values_of.setdefault(run[1], {})[run[0]] = values
    except NotImplementedError as err:
        stats.reason = str(err)
        return stats
    stats.values, stats.n_images = values_of, n
    return stats


def paired(stats: ColumnStats, a: str, b: str, level: float = LEVEL) -> dict[str, Any] | None:
    """``a`` against ``b`` on one column, over the seeds both ran: per seed the difference
    (positive: ``a`` is better, whichever way the metric points) and its bootstrap interval;
    over seeds the mean difference, its interval (the per-resample mean over seeds), the
    standard deviation of the per-seed differences, and the verdict: ``win`` when the interval
    lies above 0 and every seed's difference is positive, ``loss`` the mirror, else ``tie``."""
    if a not in stats.values or b not in stats.values:
        return None
    runs = sorted(set(stats.values[a]) & set(stats.values[b]))
    if not runs:
        return None
    d = [stats.sign * (stats.values[a][i] - stats.values[b][i]) for i in runs]
    per_seed = [
        {"seed": stats.seeds[i], "difference": float(x[0]), "interval": interval(x[1:], level)}
        for i, x in zip(runs, d, strict=True)
    ]
    mean = np.mean(d, axis=0)
    low, high = interval(mean[1:], level)
    points = [p["difference"] for p in per_seed]
    if low > 0 and all(p > 0 for p in points):
        verdict = "win"
    elif high < 0 and all(p < 0 for p in points):
        verdict = "loss"
    else:
        verdict = "tie"
    return {
        "per_seed": per_seed,
        "difference": float(mean[0]),
        "interval": (low, high),
        "sd": statistics.stdev(points) if len(points) > 1 else None,
        "verdict": verdict,
    }


def half_width(stats: ColumnStats, backbone: str, level: float = LEVEL) -> float:
    """Half the width of the bootstrap interval of the backbone's seed-mean metric: how far
    the test images alone could move the number in the transfer table."""
    low, high = interval(stats.seed_mean(backbone)[1:], level)
    return (high - low) / 2


def _main_backbones(stats: ColumnStats) -> list[str]:
    return [b for b in stats.values if not is_extra(b)]


def aggregates(
    columns: list[ColumnStats], reference: str = "student", level: float = LEVEL
) -> dict[str, Any]:
    """Over the columns of one mode (with statistics), for the main backbones present in all
    of them: mean rank (1 = best; ties share the mean rank) and mean relative error reduction
    over scratch, each with its bootstrap interval (every column under its own resamples),
    the ``reference``'s paired difference on both, and its wins / ties / losses."""
    columns = [c for c in columns if c.values]
    if not columns:
        return {}
    backbones = [b for b in _main_backbones(columns[0]) if all(b in c.values for c in columns)]
    backbones = ordered(backbones)
    oriented = [np.stack([c.sign * c.seed_mean(b) for b in backbones]) for c in columns]
    ranks = np.mean([average_ranks(o, axis=0) for o in oriented], axis=0)  # (B, 1 + R)
    rer = None
    if "scratch" in backbones:
        reductions = []
        for c in columns:
            e = [error(c.seed_mean(b), c.higher_is_better) for b in backbones]
            reductions.append(relative_error_reduction(np.stack(e), e[backbones.index("scratch")]))
        rer = np.mean(reductions, axis=0)  # (B, 1 + R)
    out: dict[str, Any] = {"columns": [c.column for c in columns], "backbones": {}}
    for k, b in enumerate(backbones):
        row: dict[str, Any] = {
            "mean_rank": float(ranks[k, 0]),
            "mean_rank_interval": interval(ranks[k, 1:], level),
        }
        if rer is not None:
            row["relative_error_reduction"] = float(rer[k, 0])
            row["relative_error_reduction_interval"] = interval(rer[k, 1:], level)
        if reference in backbones and b != reference:
            verdicts = [p["verdict"] for c in columns if (p := paired(c, reference, b, level))]
            row["wins"], row["ties"], row["losses"] = (verdicts.count(v) for v in VERDICTS)
            r = backbones.index(reference)
            rank_gain = ranks[k] - ranks[r]  # positive: the reference ranks better
            better = {"rank": (float(rank_gain[0]), interval(rank_gain[1:], level))}
            if rer is not None:
                gain = rer[r] - rer[k]
                better["relative_error_reduction"] = (float(gain[0]), interval(gain[1:], level))
            # The protocol's aggregate claim (docs/benchmark.md, section 5): the paired
            # difference in mean relative error reduction; mean rank where there is no scratch.
            _, (low, high) = better.get("relative_error_reduction", better["rank"])
            row[f"{reference}_better"] = {
                **{key: {"difference": p, "interval": i} for key, (p, i) in better.items()},
                "verdict": "better" if low > 0 else "worse" if high < 0 else "undecided",
            }
        out["backbones"][b] = row
    return out


def _extra_pairs(backbones: list[str]) -> list[tuple[str, str]]:
    """(extra student, what it is compared with): a scaling student against the student on
    the whole pool, a student started from a checkpoint against that checkpoint."""
    pairs = []
    for b in backbones:
        if b.startswith("student_pool"):
            pairs.append((b, "student"))
        elif b.startswith("student_from_"):
            pairs.append((b, b.removeprefix("student_from_")))
    return pairs


def best_minus_scratch(stats: ColumnStats, level: float = LEVEL) -> str | None:
    """Why the column stays out of the normalised score, or None when it enters: its best
    main backbone (by seed-mean metric) must be significantly better than scratch, or the
    score divides by a difference the test images could have made."""
    main = _main_backbones(stats)
    if "scratch" not in main:
        return None  # no score for this column anyway
    best = max(main, key=lambda b: stats.sign * stats.seed_mean(b)[0])
    if best == "scratch":
        return "scratch is the best backbone"
    p = paired(stats, best, "scratch", level)
    if p is None or not p["interval"][0] > 0:
        return f"best ({best}) − scratch {_difference(p)}"
    return None


def column_json(stats: ColumnStats, level: float = LEVEL) -> dict[str, Any]:
    """What report.json keeps of one column."""
    out: dict[str, Any] = {
        "task": stats.task,
        "metric": stats.metric,
        "higher_is_better": stats.higher_is_better,
        "n_test_images": stats.n_images or None,
        "no_statistics": stats.reason,
    }
    if not stats.values:
        return out
    out["metric_per_seed"] = {
        b: {str(stats.seeds[i]): float(v[0]) for i, v in runs.items()}
        for b, runs in stats.values.items()
    }
    out["half_width"] = {b: half_width(stats, b, level) for b in stats.values}
    out["student_minus"] = {
        b: p
        for b in _main_backbones(stats)
        if b != "student" and (p := paired(stats, "student", b, level))
    }
    out["comparisons"] = {
        f"{a} - {b}": p
        for a, b in _extra_pairs(list(stats.values))
        if (p := paired(stats, a, b, level))
    }
    return out


def _difference(p: dict[str, Any] | None, verdict: bool = False) -> str:
    """``+0.031 [+0.012, +0.050]`` (and the verdict)."""
    if p is None:
        return "–"
    low, high = p["interval"]
    text = f"{p['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
    return f"{text} {p['verdict']}" if verdict else text


def _test_value(info: RunInfo | None, task: str, metric: str) -> float | None:
    return info.test.get(task, {}).get(metric) if info else None


def student_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Each teacher's primary test metric on its own test split against the students'."""
    students = []
    for r in runs:
        students += [s for s in r["students"] if s not in students]
    header = ["task", "metric", "teacher", *students]
    header += [f"{s} relative to teacher" for s in students[:1]]
    rows = []
    tasks = sorted({t for r in runs for t in r["teachers"]})
    for task in tasks:
        metric, higher = primary(task)
        teacher = [_test_value(r["teachers"].get(task), task, metric) for r in runs]
        row = [task, f"{metric} {'↑' if higher else '↓'}", _mean_spread(teacher)]
        values = {}
        for s in students:
            v = [_test_value(r["students"].get(s), task, metric) for r in runs]
            values[s] = v
            row.append(_mean_spread(v))
        if students:
            # Above 1: better than the teacher, whichever way the metric points.
            pairs = zip(values[students[0]], teacher, strict=True)
            ratios = [(a / b if higher else b / a) for a, b in pairs if a and b]
            row.append(_mean_spread(ratios))
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def read_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``logs/metrics.csv`` of a training run -> {column: [(step, value), ...]}."""
    file = folder / "logs" / "metrics.csv"
    curves: dict[str, list[tuple[int, float]]] = {}
    if not file.is_file():
        return curves
    with open(file, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                curves.setdefault(key, []).append((step, float(value)))
    return curves


def plot_curves(run: Path, out: Path) -> Path | None:
    """Training loss and validation score of the teachers and students of one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = sorted((run / "teachers").glob("*")) + [
        run / n for n in STUDENTS if (run / n).is_dir()
    ]
    curves = {
        (f"teacher:{f.name}" if f.parent.name == "teachers" else f.name): read_curves(f)
        for f in folders
    }
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        if "train/loss" in c:
            steps, values = zip(*c["train/loss"], strict=True)
            axes[0].plot(steps, values, label=name, lw=1)
        if "val/score" in c:
            steps, values = zip(*c["val/score"], strict=True)
            axes[1].plot(steps, values, marker="o", label=name)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].set(title="validation score (checkpoint selection)", xlabel="step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def transfer_statistics(
    data: list[dict[str, Any]], resamples: int = RESAMPLES, level: float = LEVEL
) -> tuple[dict[str, ColumnStats], dict[str, Any]]:
    """The bootstrap statistics of every transfer column and the per-mode aggregates: the
    columns' resampled metrics and what report.json keeps of them."""
    names = sorted({c for d in data for cols in d["transfer"].values() for c in cols})
    columns = {c: column_stats(data, c, resamples) for c in names}
    with_stats = [c for c in columns.values() if c.values]
    modes = sorted({c.column.rsplit("-", 1)[1] for c in with_stats})
    left_out = {c.column: r for c in with_stats if (r := best_minus_scratch(c, level))}
    summary = {
        "resamples": resamples,
        "level": level,
        "columns": {c: column_json(s, level) for c, s in columns.items()},
        "aggregates": {
            m: aggregates([c for c in with_stats if c.column.endswith(f"-{m}")], level=level)
            for m in modes
        },
        "normalised_score_left_out": left_out,
        "no_statistics": {c: s.reason for c, s in columns.items() if s.reason},
    }
    return columns, summary


def _interval_text(point: float, bounds: tuple[float, float], signed: bool = False) -> str:
    spec = "+.3f" if signed else ".2f"
    if math.isnan(point):
        return "–"
    low, high = bounds
    return f"{point:{spec}} [{low:{spec}}, {high:{spec}}]"


def headline_lines(summary: dict[str, Any]) -> list[str]:
    """The "Headline" section: per mode, the aggregates with intervals and the student's
    wins / ties / losses, then a sentence on where the student is significantly better."""
    if not any(summary["aggregates"].values()):
        return []
    lines = [
        "## Headline",
        "",
        f"Paired bootstrap over the test images: {summary['resamples']} resamples per column "
        "(task-mode), the same for every backbone and seed of it; intervals are "
        f"{summary['level']:.0%} percentile intervals. **Mean rank**: each column ranks the "
        "backbones by their mean over seeds (1 = best, ties share the mean rank), averaged "
        "over the mode's columns. **Relative error reduction over scratch**: "
        "(e_scratch − e) / e_scratch with e = 1 − metric for ↑ metrics and the metric for ↓ "
        "ones, averaged over the columns. **Student W / T / L**: columns where the student is "
        "significantly better / neither / significantly worse than the backbone (see "
        "below). Columns without per-image test records are not in these numbers.",
        "",
    ]
    for mode, agg in summary["aggregates"].items():
        if not agg:
            continue
        rows, better, worse, undecided = [], [], [], []
        for b, row in agg["backbones"].items():
            rer = row.get("relative_error_reduction")
            rows.append(
                [
                    b,
                    _interval_text(row["mean_rank"], row["mean_rank_interval"]),
                    "–"
                    if rer is None
                    else _interval_text(rer, row["relative_error_reduction_interval"], True),
                    f"{row['wins']} / {row['ties']} / {row['losses']}" if "wins" in row else "–",
                ]
            )
            verdict = row.get("student_better", {}).get("verdict")
            {"better": better, "worse": worse, "undecided": undecided}.get(verdict, []).append(b)
        header = [
            "backbone",
            "mean rank [95% CI]",
            "rel. error reduction over scratch [95% CI]",
            "student W / T / L",
        ]
        named = (
            "the mean relative error reduction over scratch"
            if "scratch" in agg["backbones"]
            else "mean rank"
        )
        parts = [
            f"{what} {', '.join(group)}"
            for what, group in (
                ("significantly better than", better),
                ("significantly worse than", worse),
                ("undecided against", undecided),
            )
            if group
        ]
        n = len(agg["columns"])
        lines += [
            f"### {mode} ({n} column{'s' if n > 1 else ''}: {', '.join(agg['columns'])})",
            "",
            markdown_table(header, rows),
            "",
            f"**{mode}**, on the aggregate ({named}, paired 95% intervals): the student "
            f"is {'; '.join(parts)}.",
            "",
        ]
    return lines


def difference_lines(columns: dict[str, ColumnStats], summary: dict[str, Any]) -> list[str]:
    """ "Student minus each backbone", "Test images and half-widths" and the per-seed details."""
    names = [c for c, s in columns.items() if s.values]
    if not names:
        return []
    js = summary["columns"]
    backbones = ordered({b for c in names for b in js[c]["student_minus"]})
    rows = [
        [b] + [_difference(js[c]["student_minus"].get(b), True) for c in names] for b in backbones
    ]
    lines = [
        "## Student minus each backbone",
        "",
        "The student's metric minus the backbone's on the same test images, signed so that "
        "positive means the student is better (for ↓ metrics the backbone's minus the "
        "student's), mean over seeds and its 95% interval under the bootstrap. **win**: the "
        "interval lies above 0 and the student is better on every seed; **loss**: the mirror; "
        "otherwise **tie**.",
        "",
        markdown_table(["backbone", *names], rows),
        "",
        "## Test images and half-widths",
        "",
        "Per column, the number of test images and, per backbone, half the width of the 95% "
        "interval of its mean metric over seeds under the bootstrap: how far the choice of "
        "test images alone could move the number in the transfer table.",
        "",
    ]
    every = ordered({b for c in names for b in columns[c].values})
    rows = []
    for c in names:
        hw = js[c]["half_width"]
        metric = f"{js[c]['metric']} {'↑' if js[c]['higher_is_better'] else '↓'}"
        rows.append(
            [c, metric, str(js[c]["n_test_images"])]
            + [f"±{hw[b]:.3f}" if b in hw else "–" for b in every]
        )
    lines += [markdown_table(["column", "metric", "test images", *every], rows), ""]
    rows = []
    for c in names:
        stats = columns[c]
        for b in ordered(stats.values):
            for i, v in stats.values[b].items():
                p = js[c]["student_minus"].get(b)
                seed = (
                    next((x for x in p["per_seed"] if x["seed"] == stats.seeds[i]), None)
                    if p
                    else None
                )
                rows.append([c, b, str(stats.seeds[i]), f"{v[0]:.4f}", _difference(seed)])
    lines += [
        "### Per seed",
        "",
        markdown_table(
            ["column", "backbone", "seed", "metric", "student − backbone [95% CI]"], rows
        ),
        "",
    ]
    return lines


def comparison_lines(
    columns: dict[str, ColumnStats], summary: dict[str, Any], extras: list[str]
) -> list[str]:
    """The paired differences of extra students (``extras``) against what they are compared
    with, per column with statistics."""
    names = [c for c, s in columns.items() if s.values]
    pairs = [f"{a} - {b}" for a, b in _extra_pairs(extras)]
    rows = [
        [p.replace(" - ", " − ")]
        + [_difference(summary["columns"][c]["comparisons"].get(p), True) for c in names]
        for p in pairs
    ]
    rows = [r for r in rows if any(x != "–" for x in r[1:])]
    if not rows:
        return []
    return [
        "Paired difference on the same test images over the seeds both ran (positive: the "
        "first is better), 95% bootstrap interval, verdict as in the main comparison:",
        "",
        markdown_table(["comparison", *names], rows),
        "",
    ]


RISE = 0.01  # a curve still rises when its last quarter gains more than this (relative)


def still_rising(points: list[tuple[int, float]], higher: bool) -> bool:
    """Whether a validation curve's best value comes in the last quarter of its steps and is
    more than ``RISE`` (relative) better than its value at three quarters (docs/benchmark.md,
    section 3): the schedule ended before the metric settled."""
    points = sorted(points)
    if len(points) < 2:
        return False
    cut = 0.75 * points[-1][0]
    before = [v for step, v in points if step <= cut]
    after = [v for step, v in points if step > cut]
    if not before:
        return False
    ref, best_after = before[-1], (max(after) if higher else min(after))
    best_before = max(before) if higher else min(before)
    gain = (best_after - ref) if higher else (ref - best_after)
    improved = best_after > best_before if higher else best_after < best_before
    return improved and gain > RISE * max(abs(ref), 1e-12)


def transfer_val_curves(run: Path) -> Iterator[tuple[Path, str, bool, list[tuple[int, float]]]]:
    """(folder, metric, higher is better, validation curve) of every transfer run of ``run``."""
    for folder in sorted((run / "transfer").glob("*/*")):
        info = _read_info(folder)
        if info:
            task = info.config["task"]
            metric, higher = primary(task)
            yield folder, metric, higher, read_curves(folder).get(f"val/{task}/{metric}", [])


def rising_curves(runs: list[Path], seeds: list[int]) -> dict[str, dict[str, list[int]]]:
    """{column: {backbone: [seeds]}} of the transfer runs whose validation curve still rises."""
    found: dict[str, dict[str, list[int]]] = {}
    for run, seed in zip(runs, seeds, strict=True):
        for folder, _, higher, points in transfer_val_curves(run):
            if still_rising(points, higher):
                found.setdefault(folder.name, {}).setdefault(folder.parent.name, []).append(seed)
    return found


def plot_transfer_curves(run: Path, out: Path) -> Path | None:
    """One panel per downstream column: the validation primary metric against step for every
    backbone of one run (flat before the end: the schedule converged)."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    metrics: dict[str, str] = {}
    for folder, metric, higher, points in transfer_val_curves(run):
        if points:
            panels.setdefault(folder.name, {})[folder.parent.name] = points
            metrics[folder.name] = f"{metric} {'↑' if higher else '↓'}"
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows), squeeze=False)
    for ax, (column, curves) in zip(axes.flat, sorted(panels.items()), strict=False):
        for backbone, points in curves.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker=".", lw=1, label=backbone)
        ax.set(title=f"{column}: val {metrics[column]}", xlabel="step")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def example_predictions(model_dir: Path, dataset: str, out: Path, num: int = 3) -> Path | None:
    """Rows of (image, ground truth, prediction) for each task of a model, on the first test
    images of ``dataset``."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    from must.checkpoint import MODEL_FILE, load_model
    from must.config import AugmentConfig
    from must.data.readers import MultiTaskDataset
    from must.data.show import sample_panels
    from must.data.spec import load_spec
    from must.training.data import augmentation

    if not (model_dir / MODEL_FILE).is_file() or not Path(dataset).exists():
        return None
    if "test" not in load_spec(dataset)[0].splits:  # a dataset folder without test images
        return None
    model, payload = load_model(model_dir)
    model.eval()
    size = run_info(payload, model_dir).image_size or 64
    ds = MultiTaskDataset(
        dataset, split="test", transform=augmentation(AugmentConfig(), size, False)
    )
    tiles = []
    for i in range(min(num, len(ds))):
        sample = ds[i]
        image = torch.as_tensor(sample["image"])[None]  # uint8: the backbone scales it
        with torch.inference_mode():
            predictions, _ = model(image)
        shown = sample_panels({"image": sample["image"]}, {})[0]
        for task_name, task in model.tasks.items():
            if not task.has_label(sample):
                continue
            truth = {key: sample[key] for key in task.label_keys if key in sample}
            gt = _picture(task, truth, sample["image"], "truth:", shown)
            if gt is None:
                continue  # a task without a picture or a text of its labels
            size = tuple(sample["image"].shape[-2:])
            predicted = task.prediction_entries(predictions[task_name][0], size)
            pr = _picture(task, predicted or {}, sample["image"], "prediction:", shown)
            tiles += [shown, gt, torch.zeros_like(shown) if pr is None else pr]
    if not tiles:
        return None
    grid = make_grid(tiles, nrow=3, padding=2, pad_value=255)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out


def _picture(task: Any, entries: dict, image: Any, caption: str, shown: Any) -> Any:
    """A task's label or prediction as a panel: its picture, else its text under
    ``caption``, else None."""
    from must.data.show import task_picture, text_panel

    panel = task_picture(task, entries, image, task.classes)
    if panel is not None:
        return panel
    text = task.label_text(entries, task.classes)
    return None if text is None else text_panel([caption, text], *shown.shape[-2:])


def write_report(runs: list[str | Path], out: str | Path, resamples: int = RESAMPLES) -> Path:
    """Write ``report.md``, ``report.html`` and ``report.json`` (+ figures in ``report/``)
    into ``out``; ``resamples`` bootstrap resamples of the test images per column."""
    import markdown

    if resamples < 1:
        raise ConfigError(f"--resamples {resamples}: the bootstrap needs at least 1 resample")
    runs = [Path(r) for r in runs]
    data = [collect(r) for r in runs]
    out = Path(out)
    figures = out / "report"
    figures.mkdir(parents=True, exist_ok=True)
    seeds = sorted(d["seed"] for d in data)
    name = data[0]["experiment"].get("name", "experiment")
    lines = [
        f"# must report: {name}",
        "",
        f"Runs: {', '.join(str(r) for r in runs)} (seeds {', '.join(map(str, seeds))}). "
        "Cells are mean ± standard deviation over seeds; every metric is on a test split, "
        "with the checkpoint selected on validation.",
        "",
    ]
    columns, summary = transfer_statistics(data, resamples)
    left_out = summary["normalised_score_left_out"]
    lines += headline_lines(summary)
    if any(d["transfer"] for d in data):
        header, rows = transfer_table(data, left_out=left_out)
        w = wins(data)
        lines += [
            "## Transfer to the downstream tasks",
            "",
            "Fine-tuning (`finetune`) trains every weight; `probe` keeps the backbone fixed "
            "and trains the head only. Score: (metric − scratch) / (best − scratch) per "
            "task within a seed (0 = from scratch, 1 = best backbone), averaged over tasks; "
            "a column enters it only when its best backbone is significantly better than "
            "scratch (paired 95% interval above 0).",
            "",
            markdown_table(header, rows),
            "",
            f"The MuST student is the best (or tied best) backbone on {len(w['best_on'])} of "
            f"{w['columns']} columns" + (f": {', '.join(w['best_on'])}." if w["best_on"] else "."),
            "",
        ]
        for mode, ranked in score_ranking(data, left_out).items():
            if not ranked:
                continue  # every column of the mode left out (said below)
            order = ", ".join(f"{b} {v:.3f}" for b, v in ranked)
            lines += [f"Mean normalised score, {mode}, best first: {order}.", ""]
        if left_out:
            reasons = "; ".join(f"{c} ({r})" for c, r in left_out.items())
            lines += [f"Left out of the normalised score: {reasons}.", ""]
        if summary["no_statistics"]:
            reasons = "; ".join(f"{c}: {r}" for c, r in summary["no_statistics"].items())
            lines += [
                "Columns without statistics (their metrics above, no intervals, not in the "
                "headline, and in the normalised score unchecked): " + reasons + ".",
                "",
            ]
    lines += difference_lines(columns, summary)
    extras = sorted({b for d in data for b in d["transfer"] if is_extra(b)})
    pools = sorted((b for b in extras if b.startswith("student_pool")), key=lambda b: int(b[12:]))

    def seeds_with(backbone: str) -> list[dict[str, Any]]:
        # Extras usually run on fewer seeds: compare them with the student of the same seeds.
        return [d for d in data if backbone in d["transfer"]]

    if pools:
        header, rows = transfer_table(seeds_with(pools[0]), [*pools, "student"], left_out)
        lines += [
            "## More unlabelled data (scaling)",
            "",
            "Students trained on the first 25% / 50% of the pool (the teachers' own sets in "
            "full), against the student on all of it, over the seeds the scaling students ran "
            "on; scores on the scale of the main table.",
            "",
            markdown_table(header, rows),
            "",
            *comparison_lines(columns, summary, pools),
        ]
    if "student_from_multitask" in extras:
        header, rows = transfer_table(
            seeds_with("student_from_multitask"),
            ["multitask", "student_from_multitask", "student"],
            left_out,
        )
        lines += [
            "## Improving a strong checkpoint",
            "",
            "A student started from the supervised multi-task baseline, against that baseline "
            "and the student from random weights, over the seeds it ran on; scores on the scale "
            "of the main table.",
            "",
            markdown_table(header, rows),
            "",
            *comparison_lines(columns, summary, ["student_from_multitask"]),
        ]
    rising = rising_curves(runs, [d["seed"] for d in data])
    summary["still_rising"] = rising
    curves = plot_transfer_curves(runs[0], figures / "transfer_curves.png")
    if curves:
        lines += [
            "## Downstream validation curves",
            "",
            f"Validation primary metric against step of every transfer run of seed "
            f"{data[0]['seed']}: flat before the end means the schedule converged.",
            "",
            f"![downstream validation curves]({curves.relative_to(out)})",
            "",
        ]
    if any(d["transfer"] for d in data):
        flagged = "; ".join(
            f"{c}: " + ", ".join(f"{b} (seed {', '.join(map(str, s))})" for b, s in bs.items())
            for c, bs in sorted(rising.items())
        )
        lines += [
            "Still rising at the end (best validation value in the last quarter of the "
            f"schedule, more than {RISE:.0%} better than at three quarters): "
            + (flagged + "." if flagged else "none, in any seed."),
            "",
        ]
    if any(d["teachers"] for d in data):
        header, rows = student_table(data)
        lines += [
            "## Students against their teachers",
            "",
            "Each teacher's primary metric on its own test split, and the students' on the "
            "same split.",
            "",
            markdown_table(header, rows),
            "",
        ]
    first = data[0]
    if first["students"]:
        lines += ["## Loss weights and data", ""]
        for s, info in first["students"].items():
            weights = info.loss_weighting or {}
            training = next(iter(info.training.values()), None)
            images = training.train_images if training else None
            lines.append(
                f"- **{s}** (seed {first['seed']}): {weights.get('kind')} weights "
                f"{weights.get('weights', weights.get('final'))}; {images} training images; "
                f"{info.steps} steps in {info.train_seconds} s"
                + (f"; started from {info.init['from']}" if info.init else "")
            )
        for task, info in first["teachers"].items():
            t = info.training.get(task)
            if t is None:
                continue
            lines.append(
                f"- teacher **{task}**: {t.train_images} images of {t.dataset_name}, "
                f"batch {t.batch_size}, lr {t.lr}, {info.steps} steps in "
                f"{info.train_seconds} s"
            )
        lines.append("")
    curves = plot_curves(runs[0], figures / "curves.png")
    if curves:
        lines += ["## Training curves", "", f"![training curves]({curves.relative_to(out)})", ""]
    examples = []
    for s in ("student",):
        info = first["students"].get(s)
        if info:
            for task, dataset in info.evaluated_on.items():
                pic = example_predictions(runs[0] / s, dataset, figures / f"{s}-{task}.png")
                if pic:
                    examples.append((f"{s} on the {task} teacher's test images", pic))
    for folder in sorted((runs[0] / "transfer" / "student").glob("*")):
        info = _read_info(folder)
        if info:
            training = info.training.get(info.config["task"])
            dataset = training.dataset if training else None
            pic = dataset and example_predictions(
                folder, dataset, figures / f"transfer-{folder.name}.png"
            )
            if pic:
                examples.append((f"student backbone transferred: {folder.name}", pic))
    if examples:
        lines += ["## Example predictions", "", "Each row: image, ground truth, prediction.", ""]
        for title, pic in examples:
            lines += [f"### {title}", "", f"![{title}]({pic.relative_to(out)})", ""]
    stages = first.get("stages", {})
    if stages:
        lines += [
            "## Stages",
            "",
            markdown_table(
                ["stage", "status", "seconds"],
                [[s, v.get("status", ""), str(v.get("seconds", ""))] for s, v in stages.items()],
            ),
            "",
        ]
    text = "\n".join(lines)
    md = out / "report.md"
    md.write_text(text)
    body = markdown.markdown(text, extensions=["tables"])
    html = (
        "<!doctype html><html><head><meta charset='utf-8'><title>must report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}"
        "img{max-width:100%}</style></head><body>" + body + "</body></html>"
    )
    (out / "report.html").write_text(html)
    (out / "report.json").write_text(
        json.dumps(
            _plain(
                {
                    "runs": [str(r) for r in runs],
                    "transfer": [d["transfer"] for d in data],
                    "statistics": summary,
                }
            ),
            indent=1,
            allow_nan=False,
        )
    )
    return md


def _plain(value: Any) -> Any:
    """JSON-ready: an undefined number (NaN, e.g. an interval of an undefined statistic)
    becomes null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
