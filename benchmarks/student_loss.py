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
from must.student import train_student

SETTINGS = {
    "depth1": ["loss.hand.depth=1"],  # the preset: MuST's rule, depth weight 1
    "depth4": ["loss.hand.depth=4"],
    "depth10": ["loss.hand.depth=10"],
    "uncertainty": ["loss.kind=uncertainty"],
}
SCHEDULE = ["train.max_steps=400", "train.val_every=400", "train.warmup_steps=50"]
COLUMNS = {
    ("classification", "top1"): "↑",
    ("detection", "map_50"): "↑",
    ("segmentation", "miou"): "↑",
    ("depth", "delta1"): "↑",
    ("depth", "abs_rel"): "↓",
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
        info = train_student(cfg, work / "sweep" / name, progress=False)["info"]
        results[name] = {
            "overrides": overrides,
            "loss_weighting": info["loss_weighting"],
            "val": {f"{t}/{m}": info["val"][t][m] for t, m in COLUMNS},
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
        "| setting | overrides | " + " | ".join(f"{t} {m} {d}" for (t, m), d in COLUMNS.items()),
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for name, r in results.items():
        values = " | ".join(f"{v:.3f}" for v in r["val"].values())
        lines.append(f"| {name} | `{' '.join(r['overrides'])}` | {values} |")
    (out / "student_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
