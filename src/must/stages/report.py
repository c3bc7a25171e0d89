"""``must report``: one or more run folders of ``must run`` (one per seed) -> ``report.md``
and ``report.html`` with the transfer table (mean ± spread over seeds, normalised transfer
score), the student against its teachers, loss weights and data, training curves, and
example predictions next to the ground truth.

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
from pathlib import Path
from typing import Any

import yaml

from must.checkpoint import SUMMARY_FILE
from must.errors import ConfigError
from must.summary import RunInfo, run_info
from must.tasks import TASK_TYPES

STUDENTS = ("student", "multitask", "student_from_multitask")


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
            out["transfer"].setdefault(folder.parent.name, {})[folder.name] = {
                "task": task,
                "metric": metric,
                "value": value,
                "test": info.test.get(task, {}),
            }
    status = run / "stages.json"
    out["stages"] = json.loads(status.read_text()) if status.is_file() else {}
    return out


def is_extra(backbone: str) -> bool:
    """The students of the scaling and strong-checkpoint experiments: reported beside the main
    comparison, not part of it (they do not set its "best")."""
    return backbone.startswith(("student_pool", "student_from_"))


def normalised_scores(transfer: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Per backbone, per column (task-mode): the normalised transfer score of one seed. The
    best is that of the main backbones; extra students are scored on the same scale (and
    may exceed 1)."""
    columns = sorted({c for cols in transfer.values() for c in cols})
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


def transfer_table(
    runs: list[dict[str, Any]], rows_of: list[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Rows: backbones (``rows_of``, default the main ones); columns: task-mode primary
    metrics, then the mean normalised score per mode; cells: mean ± standard deviation over
    the runs (seeds)."""
    backbones: list[str] = []
    for r in runs:
        backbones += [b for b in r["transfer"] if b not in backbones]
    if rows_of is None:
        backbones = [b for b in backbones if not is_extra(b)]
    else:
        backbones = [b for b in rows_of if b in backbones]
    order = {"scratch": 0, "simclr": 2, "multitask": 3, "student": 4}
    if rows_of is None:
        backbones.sort(key=lambda b: (order.get(b, 1 if b.startswith("teacher") else 5), b))
    columns = sorted({c for r in runs for cols in r["transfer"].values() for c in cols})
    modes = sorted({c.rsplit("-", 1)[1] for c in columns})
    per_run_scores = [normalised_scores(r["transfer"]) for r in runs]
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


def score_ranking(runs: list[dict[str, Any]]) -> dict[str, list[tuple[str, float]]]:
    """Per mode, backbones by mean normalised score over tasks and seeds, best first."""
    per_run_scores = [normalised_scores(r["transfer"]) for r in runs]
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


def write_report(runs: list[str | Path], out: str | Path) -> Path:
    """Write ``report.md`` and ``report.html`` (+ figures in ``report/``) into ``out``."""
    import markdown

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
    if any(d["transfer"] for d in data):
        header, rows = transfer_table(data)
        w = wins(data)
        lines += [
            "## Transfer to the downstream tasks",
            "",
            "Fine-tuning (`finetune`) trains every weight; `probe` keeps the backbone fixed "
            "and trains the head only. Score: (metric − scratch) / (best − scratch) per "
            "task within a seed (0 = from scratch, 1 = best backbone), averaged over tasks.",
            "",
            markdown_table(header, rows),
            "",
            f"The MuST student is the best (or tied best) backbone on {len(w['best_on'])} of "
            f"{w['columns']} columns" + (f": {', '.join(w['best_on'])}." if w["best_on"] else "."),
            "",
        ]
        for mode, ranked in score_ranking(data).items():
            order = ", ".join(f"{b} {v:.3f}" for b, v in ranked)
            lines += [f"Mean normalised score, {mode}, best first: {order}.", ""]
    extras = sorted({b for d in data for b in d["transfer"] if is_extra(b)})
    pools = sorted((b for b in extras if b.startswith("student_pool")), key=lambda b: int(b[12:]))

    def seeds_with(backbone: str) -> list[dict[str, Any]]:
        # Extras usually run on fewer seeds: compare them with the student of the same seeds.
        return [d for d in data if backbone in d["transfer"]]

    if pools:
        header, rows = transfer_table(seeds_with(pools[0]), [*pools, "student"])
        lines += [
            "## More unlabelled data (scaling)",
            "",
            "Students trained on the first 25% / 50% of the pool (the teachers' own sets in "
            "full), against the student on all of it, over the seeds the scaling students ran "
            "on; scores on the scale of the main table.",
            "",
            markdown_table(header, rows),
            "",
        ]
    if "student_from_multitask" in extras:
        header, rows = transfer_table(
            seeds_with("student_from_multitask"), ["multitask", "student_from_multitask", "student"]
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
            {"runs": [str(r) for r in runs], "transfer": [d["transfer"] for d in data]}, indent=1
        )
    )
    return md
