"""The student's loss settings compared on validation, side by side in one run.

Decides settings such as MuST's hand-set depth weight on the validation splits (never on the
test splits that ``benchmarks/student.py`` reports). Uses the stores that
``benchmarks/student.py`` labelled into ``--work`` (run that first); each setting trains the
``train_student_cpu`` student for the same short schedule into ``--work/sweep/NAME``. A setting
already trained there with the same config is not trained again.

    python benchmarks/student_loss.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from must.config import StudentConfig, load_config
from must.stages.evaluate import evaluate
from must.stages.train import train_student

SETTINGS = {
    "depth1": ["loss.hand.depth=1"],  # the preset: MuST's rule, depth weight 1
    "depth4": ["loss.hand.depth=4"],
    "depth10": ["loss.hand.depth=10"],
    "uncertainty": ["loss.kind=uncertainty"],
    # Depth targets keep their values under crop zoom (see docs/student.md, "Depth's scale").
    "depth4_fixed_scale": ["loss.hand.depth=4", "data.augment.depth_scales_with_zoom=false"],
    # ... and detection's training set drawn 1.5 times as often as each other store.
    "depth4_fixed_scale_det1.5": [
        "loss.hand.depth=4",
        "data.augment.depth_scales_with_zoom=false",
        "data.store_weights=[1,1,1.5,1,1]",
    ],
}
SCHEDULE = ["train.max_steps=400", "train.val_every=400", "train.warmup_steps=50"]
COLUMNS = {
    ("classification", "top1"): "↑",
    ("detection", "map_50"): "↑",
    ("segmentation", "miou"): "↑",
    ("depth", "delta1"): "↑",
    ("depth", "abs_rel"): "↓",
    # Diagnostics: 1 = no global scale error; delta1 after per-image median scaling.
    ("depth", "scale_gt_over_pred"): "→1",
    ("depth", "delta1_aligned"): "↑",
}
STORES = ("pool", "classification", "detection", "segmentation", "depth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default="runs/bench-student")
    args = parser.parse_args()
    work = Path(args.work)
    stores = [str(work / f"store-{name}") for name in STORES]
    missing = [s for s in stores if not (Path(s) / "manifest.json").exists()]
    if missing:
        raise SystemExit(f"missing stores {missing}: run benchmarks/student.py first")
    results = {}
    for name, overrides in SETTINGS.items():
        cfg = load_config(
            StudentConfig,
            "train_student_cpu",
            [f"data.stores={json.dumps(stores)}", *SCHEDULE, *overrides],
        )
        run = work / "sweep" / name
        info = train_student(cfg, run, progress=False)["info"]
        # Evaluated here, not read from the summary, so runs made before the diagnostics
        # existed get them too (same checkpoint, same split).
        depth_val = evaluate(run, info["evaluated_on"]["depth"], "val", progress=False)["depth"]
        val = {f"{t}/{m}": v for t, metrics in info["val"].items() for m, v in metrics.items()}
        val |= {f"depth/{m}": v for m, v in depth_val.items()}
        results[name] = {
            "overrides": overrides,
            "loss_weighting": info["loss_weighting"],
            "val": {f"{t}/{m}": val[f"{t}/{m}"] for t, m in COLUMNS},
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student_loss.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# The student's loss settings on validation",
        "",
        "Command: `python benchmarks/student_loss.py --out benchmarks/results` (after "
        "`benchmarks/student.py`, whose stores it trains on). Each setting: `train_student_cpu` "
        f"with `{' '.join(SCHEDULE)}`; metrics on the validation split of each teacher's style "
        "at the checkpoint chosen on validation. One run per setting: differences of a few "
        "hundredths are within run-to-run noise.",
        "",
        "| setting | overrides | "
        + " | ".join(f"{t} {m} {d}" for (t, m), d in COLUMNS.items())
        + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for name, r in results.items():
        values = " | ".join(f"{v:.3f}" for v in r["val"].values())
        lines.append(f"| {name} | `{' '.join(r['overrides'])}` | {values} |")
    (out / "student_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
