"""The MuST student against its teachers, side by side in one run, on the embedded world.

Uses the CPU-preset teachers of ``benchmarks/teachers.py`` (trained first if missing), labels
the ``mixed`` pool and each teacher's own training set (``--keep-real``: real labels for the
teacher's task, pseudo labels for the others), trains the student (``train_student_cpu``)
on all of them, and compares each task's test metric on the teacher's own test split.
Also compares training cost per image: the student against the four teachers summed.

    python benchmarks/student.py --out benchmarks/results [KEY=VALUE student overrides]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from must.checkpoint import load_model
from must.config import StudentConfig, load_config
from must.data.source import DataSource
from must.stages.evaluate import evaluate
from must.stages.label import label_images
from must.stages.train import train_student

TASKS = {
    "classification": "top1",
    "detection": "map_50",
    "segmentation": "miou",
    "depth": "delta1",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--teachers", default="runs/bench-teachers")
    parser.add_argument("--work", default="runs/bench-student")
    parser.add_argument("--pool", type=int, default=3000, help="unlabeled pool images")
    parser.add_argument("overrides", nargs="*", help="student config overrides")
    args = parser.parse_args()
    teachers_dir, work = Path(args.teachers), Path(args.work)
    if not all((teachers_dir / t / "model.safetensors").exists() for t in TASKS):
        subprocess.run(
            [sys.executable, "benchmarks/teachers.py", "--work", str(teachers_dir)], check=True
        )
    teachers = [str(teachers_dir / t) for t in TASKS]
    start = time.perf_counter()
    stores = [work / "store-pool"]
    label_images(
        teachers, DataSource(dataset="mixed", cache=str(work / "data"), num=args.pool, render_size=64), stores[0],
        workers=1, progress=False,
    )  # fmt: skip
    for task in TASKS:
        dataset = load_model(teachers_dir / task)[1]["info"]["training"][task]["dataset"]
        stores.append(work / f"store-{task}")
        label_images(teachers, dataset, stores[-1], keep_real=True, workers=1, progress=False)
    label_seconds = time.perf_counter() - start
    cfg = load_config(
        StudentConfig,
        "train_student_cpu",
        [f"data.stores={json.dumps([str(s) for s in stores])}", *args.overrides],
    )
    summary = train_student(cfg, work / "student", overwrite=True, progress=False)
    info = summary["info"]
    teacher_info = {t: load_model(teachers_dir / t)[1]["info"] for t in TASKS}

    def per_image(i: dict, task: str) -> float:
        tr = i["training"][task]
        return i["train_seconds"] / (i["steps"] * tr["batch_size"])

    rows = {}
    for task, metric in TASKS.items():
        t, s = teacher_info[task]["test"][task][metric], info["test"][task][metric]
        rows[task] = {"metric": metric, "teacher": t, "student": s, "ratio": s / t if t else None}
    # Depth's error split into a global scale error and a structural one (docs/student.md).
    depth_split = {
        who: {
            k: evaluate(path, info["evaluated_on"]["depth"], "test", progress=False)["depth"][k]
            for k in ("scale_gt_over_pred", "delta1_aligned")
        }
        for who, path in (("teacher", teachers_dir / "depth"), ("student", work / "student"))
    }
    teachers_cost = sum(per_image(teacher_info[t], t) for t in TASKS)
    student_cost = per_image(info, "classification")
    results = {
        "tasks": rows,
        "loss_weighting": info["loss_weighting"],
        "student_steps": info["steps"],
        "student_batch_size": cfg.train.batch_size,
        "train_images": info["training"]["classification"]["train_images"],
        "seconds_per_image": {"student": student_cost, "four_teachers_summed": teachers_cost},
        "depth_scale_and_structure": depth_split,
        "label_seconds": round(label_seconds, 1),
        "student_train_seconds": info["train_seconds"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# MuST student against its teachers (CPU presets)",
        "",
        "Command: `python benchmarks/student.py --out benchmarks/results "
        + " ".join(args.overrides)
        + "`. Each metric on the teacher's own test split. Student trained on the "
        f"pseudo-labelled `mixed` pool (train split of a {args.pool}-image render) plus the four teachers' training "
        "sets labelled with `--keep-real`, with MuST's loss weights "
        f"{ {k: round(v, 3) for k, v in info['loss_weighting'].get('weights', {}).items()} }.",
        "",
        "| task | metric | teacher | student | student / teacher |",
        "|---|---|---:|---:|---:|",
    ]
    for task, r in rows.items():
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "n/a"
        lines.append(
            f"| {task} | {r['metric']} | {r['teacher']:.3f} | {r['student']:.3f} | {ratio} |"
        )
    lines += [
        "",
        f"Training cost per image seen: student {student_cost * 1000:.1f} ms, the four teachers "
        f"summed {teachers_cost * 1000:.1f} ms (ratio {student_cost / teachers_cost:.2f}). "
        f"Labelling the pool and the four training sets: {label_seconds:.0f} s in this run "
        "(finished stores are reused, not labelled again).",
        "",
        "Depth on the same test split, global scale against structure: geometric mean of true "
        "over predicted depth (1 = no scale error) teacher "
        f"{depth_split['teacher']['scale_gt_over_pred']:.3f}, student "
        f"{depth_split['student']['scale_gt_over_pred']:.3f}; delta1 after scaling each "
        f"image by its median ratio teacher {depth_split['teacher']['delta1_aligned']:.3f}, "
        f"student {depth_split['student']['delta1_aligned']:.3f}.",
    ]
    (out / "student.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
