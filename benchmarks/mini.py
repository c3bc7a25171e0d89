"""The MuST claims measured on the scene world: the ``mini`` experiment, one run per seed, then
one report merging the seeds, with its tables copied to ``benchmarks/results/mini.md``.

    python benchmarks/mini.py --seeds 0 1 2 --out benchmarks/results
    python benchmarks/mini.py --seeds 0 --extras --out benchmarks/results   # + (b) and (c)

Without ``--extras`` each seed runs experiment (a) only (teachers, labels, student, SimCLR,
multi-task baseline, transfers); with it, the scaling and strong-checkpoint students too.
Seeds already complete in ``--work`` are skipped by ``must run`` itself, so seeds can be run
in separate sittings (or on another machine, with the run folders copied into ``--work``)
and merged by re-running this script with every seed listed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

A_STAGES = ["teachers", "label", "student", "simclr", "multitask", "transfer", "report"]
ALL_STAGES = [*A_STAGES[:-2], "scaling", "strong", "transfer", "report"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--extras", action="store_true", help="also (b) scaling, (c) strong")
    parser.add_argument("--work", default="runs/mini")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--report-only", action="store_true", help="merge existing runs")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    must = [sys.executable, "-m", "must.cli"]
    timings = {}
    for seed in args.seeds:
        run = work / f"seed{seed}"
        if args.report_only:
            continue
        stages = ALL_STAGES if args.extras else A_STAGES
        start = time.perf_counter()
        subprocess.run(
            [*must, "run", "mini", "--out", str(run), f"seed={seed}",
             f"data_cache={work / 'data'}", "--quiet", "--only", *stages],
            check=True,
        )  # fmt: skip
        timings[seed] = round(time.perf_counter() - start, 1)
    runs = [str(work / f"seed{s}") for s in args.seeds]
    subprocess.run([*must, "report", *runs, "--out", str(work)], check=True)
    report = (work / "report.md").read_text()
    # Keep the tables and the text, not the pictures (they stay in the run folders).
    tables = report.split("## Training curves")[0].split("## Loss weights and data")[0]
    # The downstream validation curves (is each schedule converged?) travel with the tables.
    curves = work / "report" / "transfer_curves.png"
    if curves.is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(curves, out / "mini_transfer_curves.png")
        tables = tables.replace("](report/transfer_curves.png)", "](mini_transfer_curves.png)")
    stage_seconds = {}
    for s in args.seeds:
        status_file = work / f"seed{s}" / "stages.json"
        if status_file.is_file():
            status = json.loads(status_file.read_text())
            stage_seconds[s] = {
                k: v.get("total_seconds", v.get("seconds")) for k, v in status.items()
            }
    command = "python benchmarks/mini.py --seeds " + " ".join(map(str, args.seeds))
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        tables.rstrip(),
        "",
        f"Command: `{command}`" + (" (plus `--extras` for seed 0)" if args.extras else ""),
        "",
        "Seconds of compute per stage (2-core CPU, summed over the invocations of the run):",
        "",
        "| seed | " + " | ".join(ALL_STAGES) + " |",
        "|---|" + "---|" * len(ALL_STAGES),
    ]
    for s, secs in stage_seconds.items():
        lines.append(f"| {s} | " + " | ".join(str(secs.get(k, "–")) for k in ALL_STAGES) + " |")
    (out / "mini.md").write_text("\n".join(lines) + "\n")
    shutil.copy(work / "report.json", out / "mini.json")
    print(f"wrote {out / 'mini.md'} and {out / 'mini.json'}; timings {timings}")


if __name__ == "__main__":
    main()
