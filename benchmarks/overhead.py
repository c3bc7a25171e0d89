"""Framework overhead: ``must teach`` against a bare, hand-written PyTorch loop doing the same
work, interleaved (must, bare, must, bare, ...), each in a fresh process.

Both runs build the same model from the same preset (random weights), read the same rendered
dataset through the same reader, augmentation, collation and ``DataLoader`` settings, take the
same optimizer and schedule (SGD or AdamW with warm-up + cosine, per-batch steps, gradient
clipping), run at the same precision, train ``--steps`` steps, validate once at the end (as
``must teach`` always validates its final weights) and save a checkpoint. The measured span is
``must teach``'s own training clock (``train_seconds``: from the start of training to its end,
which holds the final validation and checkpoint writes) against the same span of the bare
loop. Everything outside that span (start-up, data preparation, the final test pass, writing
the model file) is the fixed cost of a run, reported separately in seconds.

    python benchmarks/overhead.py --out benchmarks/results [--presets teach_detection_cpu ...]
        [--steps 60] [--pairs 3] [--num 600]

Separate processes differ in speed by more than the effect (the machine drifts), so
``--in-process`` measures the per-step cost another way: ``must teach`` runs in this process
and a callback hands the CPU to the bare loop every ``--block`` steps, alternating short
blocks of each, timed separately (``overhead_in_process.{json,md}``):

    python benchmarks/overhead.py --in-process --out benchmarks/results [--block 10]
        [--blocks 16 teach_classification_cpu=200 ...] [--warm 20] [--num 2000]
        [--data-cache DIR]

``--blocks`` takes a count for every preset and ``PRESET=COUNT`` for single ones: a preset
whose ratio lies close to 0.95 needs more pairs to be decided than one far from it.
``--update`` runs only ``--presets`` and replaces their rows in the existing results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from common import spread, write_results

PRESETS = [
    "teach_classification_cpu",
    "teach_detection_cpu",
    "teach_segmentation_cpu",
    "teach_depth_cpu",
]


def overrides(args: argparse.Namespace, cache: Path) -> list[str]:
    """The run's settings: a short schedule validated and checkpointed once, at its end."""
    s = args.steps
    return [
        f"data.cache={cache}",
        f"data.num={args.num}",
        f"train.max_steps={s}",
        f"train.val_every={s}",
        f"train.checkpoint_every={s}",
        f"train.warmup_steps={min(10, s)}",
        *args.extra,
    ]


def run_must(preset: str, opts: list[str], out: Path) -> dict:
    """``must teach`` in a fresh process; its training clock and the process's wall time."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "must", "teach", preset, "--out", str(out), "--overwrite", *opts],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    info = json.loads((out / "summary.json").read_text())["info"]
    images = info["steps"] * info["training"][next(iter(info["training"]))]["batch_size"]
    return {
        "images_per_s": images / info["train_seconds"],
        "train_seconds": info["train_seconds"],
        "wall_seconds": wall,
        "fixed_seconds": wall - info["train_seconds"],
    }


def run_bare(preset: str, opts: list[str]) -> dict:
    """The bare loop in a fresh process (this file with ``--bare``)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--bare", preset, *[f"--opt={o}" for o in opts]],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


class BareLoop:
    """The hand-written loop: model, data and optimizer built from the same settings as
    ``must teach`` builds them, trained with plain PyTorch."""

    def __init__(self, preset: str, opts: list[str]) -> None:
        from must.config import TeachConfig, load_config
        from must.models.model import MultiTaskModel
        from must.tasks import build_task
        from must.training.data import make_dataset, make_loader, resolve_workers
        from must.training.fit import resolve_precision
        from must.training.module import optimizer_and_schedule

        cfg = load_config(TeachConfig, preset, opts)
        self.task_name, self.train_cfg = cfg.task, cfg.train
        tc = cfg.train
        root = cfg.data.prepare(progress=False)
        train_set = make_dataset(root, "train", cfg.data, train=True, tasks=[cfg.task])
        val_set = make_dataset(root, "val", cfg.data, train=False, tasks=[cfg.task])
        torch.manual_seed(tc.seed)
        task = build_task(cfg.task, train_set.classes.get(cfg.task), cfg.model.heads.get(cfg.task))
        self.model = MultiTaskModel(cfg.model.backbone, {cfg.task: task})
        workers = resolve_workers(cfg.data.num_workers)
        self.train_loader = make_loader(
            train_set, self.model.tasks, tc.batch_size, workers, True, tc.seed
        )
        self.val_loader = make_loader(val_set, self.model.tasks, tc.batch_size, workers, False)
        opt_and_schedule = optimizer_and_schedule(list(self.model.parameters()), tc)
        self.opt = opt_and_schedule["optimizer"]
        self.schedule = opt_and_schedule["lr_scheduler"]["scheduler"]
        bf16 = resolve_precision(tc) == "bf16-mixed"
        self.autocast = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
        )
        self.metric = task.new_metric()
        self.batches = iter(())

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch, as the Lightning loop starts one
            self.batches = iter(self.train_loader)
            return next(self.batches)

    def steps(self, n: int) -> None:
        """``n`` training steps: fetch, forward, backward, clip, optimizer and schedule step."""
        self.model.train()
        for _ in range(n):
            batch = self.next_batch()
            with self.autocast():
                _, losses = self.model(batch.images, batch.targets)
            loss = sum(losses[self.task_name].values())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.train_cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
            self.opt.step()
            self.schedule.step()

    def validate_and_save(self) -> None:
        """One validation pass and the two checkpoints ``must teach`` keeps (last and best)."""
        self.model.eval()
        with torch.no_grad():
            for batch in self.val_loader:
                with self.autocast():
                    predictions, _ = self.model(batch.images)
                if self.task_name in batch.targets:
                    self.metric.update(predictions[self.task_name], batch.targets[self.task_name])
        self.metric.compute()
        with tempfile.TemporaryDirectory() as tmp:
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
            for name in ("last.pt", "best.pt"):
                torch.save(state, Path(tmp) / name)


def bare_loop(preset: str, opts: list[str]) -> dict:
    """Train, validate once and checkpoint by hand: what ``must teach`` does inside its clock."""
    loop = BareLoop(preset, opts)
    start = time.perf_counter()
    loop.steps(loop.train_cfg.max_steps)
    loop.validate_and_save()
    seconds = time.perf_counter() - start
    images = loop.train_cfg.max_steps * loop.train_cfg.batch_size
    return {"images_per_s": images / seconds, "train_seconds": seconds}


class Interleave(Callback):
    """Inside ``must teach``'s training loop, every ``block`` steps: stop the clock of the
    Lightning block that just ended, run ``block`` steps of the bare loop on its own clock, and
    start the next Lightning block. Both alternate in one process within seconds of each
    other, so the machine's drift (which swamps a 5% effect between separate processes) hits
    both alike."""

    def __init__(self, bare: BareLoop, block: int, warm: int) -> None:
        self.bare, self.block, self.warm = bare, block, warm
        self.mark: float | None = None
        self.must_seconds: list[float] = []
        self.bare_seconds: list[float] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        step = trainer.global_step
        if step < self.warm or (step - self.warm) % self.block:
            return
        now = time.perf_counter()
        if self.mark is None:
            self.bare.steps(self.warm)  # the bare loop's own warm-up, untimed
        else:
            self.must_seconds.append(now - self.mark)
            start = time.perf_counter()
            self.bare.steps(self.block)
            self.bare_seconds.append(time.perf_counter() - start)
        self.mark = time.perf_counter()


def in_process(preset: str, opts: list[str], block: int, blocks: int, warm: int, out: Path) -> dict:
    """``must teach`` (in this process, progress bar on, as the command runs) with the bare
    loop interleaved block by block; per pair of blocks, the time of each."""
    import must.training.fit as fit
    from must.config import TeachConfig, load_config
    from must.stages.teach import teach

    steps = warm + block * blocks + 1  # the last block ends at a hook of its own
    # Validation only at the end (the bare loop validates once too); the preset's periodic
    # checkpoints and logging stay inside the blocks, as they are per-step framework cost.
    opts = [*opts, f"train.max_steps={steps}", f"train.val_every={steps}"]
    bare = BareLoop(preset, opts)
    hook = Interleave(bare, block, warm)
    make_trainer = fit.make_trainer

    def with_hook(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.callbacks.append(hook)
        return trainer

    fit.make_trainer = with_hook
    start = time.perf_counter()
    try:
        summary = teach(load_config(TeachConfig, preset, opts), out, overwrite=True, progress=True)
    finally:
        fit.make_trainer = make_trainer
    # The run's cost outside its training clock (which holds the bare blocks too): reading the
    # data, building the model, the trainer's set-up, the test pass, the model file. This is
    # what every run of ``must run`` adds, which starts Python and imports once for all runs.
    outside = time.perf_counter() - start - summary["info"]["train_seconds"]
    return {
        "must_seconds": hook.must_seconds,
        "bare_seconds": hook.bare_seconds,
        "batch_size": bare.train_cfg.batch_size,
        "outside_training_seconds": round(outside, 2),
    }


def ratio_interval(must: list[float], bare: list[float], resamples: int = 2000) -> dict:
    """must / bare throughput (bare time over must time, summed over pairs of blocks) with a
    95% percentile bootstrap interval over the pairs."""
    from must.stats import bootstrap_weights, interval

    m, b = np.asarray(must), np.asarray(bare)
    counts = bootstrap_weights(len(m), resamples, seed=0)  # how often each pair is drawn
    low, high = interval(counts @ b / (counts @ m))
    return {"ratio": float(b.sum() / m.sum()), "low": float(low), "high": float(high)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (must, bare) pairs")
    parser.add_argument("--num", type=int, default=600, help="images rendered per dataset")
    parser.add_argument(
        "--worker-pairs",
        type=int,
        default=0,
        help="also compare must teach with 0 and 1 loader workers (interleaved pairs)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="interleave must teach and the bare loop block by block in one process (writes "
        "overhead_in_process.{json,md})",
    )
    parser.add_argument("--block", type=int, default=10, help="--in-process: steps per block")
    parser.add_argument(
        "--blocks",
        nargs="+",
        default=["16"],
        help="--in-process: pairs of blocks, for every preset (N) or one (PRESET=N)",
    )
    parser.add_argument("--data-cache", help="--in-process: render into (or reuse) this data cache")
    parser.add_argument("--warm", type=int, default=20, help="--in-process: untimed first steps")
    parser.add_argument(
        "--update",
        action="store_true",
        help="--in-process: replace only these presets' rows of the existing results",
    )
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # internal: run the bare loop
    parser.add_argument("--opt", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="config overrides for both runs")
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare_loop(args.bare, args.opt)))
        return

    load = os.getloadavg()[0]
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_before": round(load, 2),
        },
        # Where files go or come from is no setting of the measurement (and names this machine).
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("out", "bare", "opt", "data_cache")
        },
        "presets": {},
    }
    if args.in_process:
        main_in_process(args, results)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "data"
        for preset in args.presets:
            opts = overrides(args, cache)
            run_must(preset, opts, Path(tmp) / "warm")  # renders the data; warms the caches
            pairs = []
            for i in range(args.pairs):
                m = run_must(preset, opts, Path(tmp) / f"{preset}-{i}")
                b = run_bare(preset, opts)
                pairs.append({"must": m, "bare": b, "ratio": m["images_per_s"] / b["images_per_s"]})
                print(
                    f"{preset} pair {i}: must {m['images_per_s']:.1f} images/s, bare "
                    f"{b['images_per_s']:.1f} images/s, ratio {pairs[-1]['ratio']:.3f}; fixed "
                    f"cost {m['fixed_seconds']:.1f} s"
                )
            workers = []
            for i in range(args.worker_pairs):
                w0 = run_must(preset, [*opts, "data.num_workers=0"], Path(tmp) / f"{preset}-w0")
                w1 = run_must(preset, [*opts, "data.num_workers=1"], Path(tmp) / f"{preset}-w1")
                workers.append(
                    {"w0": w0, "w1": w1, "ratio": w1["images_per_s"] / w0["images_per_s"]}
                )
                print(
                    f"{preset} workers pair {i}: 1 worker / in-process {workers[-1]['ratio']:.3f}"
                )
            results["presets"][preset] = {
                "workers": workers,
                "pairs": pairs,
                "ratio": spread([p["ratio"] for p in pairs]),
                "must_images_per_s": spread([p["must"]["images_per_s"] for p in pairs]),
                "bare_images_per_s": spread([p["bare"]["images_per_s"] for p in pairs]),
                "fixed_seconds": spread([p["must"]["fixed_seconds"] for p in pairs]),
            }
    results["machine"]["load_after"] = round(os.getloadavg()[0], 2)
    write_results(args.out, "overhead", results, report(results))


def target_verdict(low: float, high: float, undecided: str, target: float = 0.95) -> str:
    """ "meets" when the whole range lies at or above ``target``, "misses" when below."""
    if low >= target:
        return "meets"
    return "misses" if high < target else undecided


def blocks_per_preset(values: list[str], presets: list[str]) -> dict[str, int]:
    """``--blocks`` as preset -> pairs of blocks: ``N`` sets every preset, ``PRESET=N`` one."""
    counts = dict.fromkeys(presets, 16)
    for value in values:
        preset, _, count = value.rpartition("=")
        if preset and preset not in counts:
            raise SystemExit(f"--blocks {value}: {preset} is not among --presets")
        if not count.isdigit() or int(count) < 2:
            raise SystemExit(f"--blocks {value}: the count must be an integer of at least 2")
        for name in [preset] if preset else presets:
            counts[name] = int(count)
    return counts


def in_process_command(s: dict) -> str:
    blocks = s["blocks"] if isinstance(s["blocks"], list) else [s["blocks"]]  # older files: one
    return (
        f"python benchmarks/overhead.py --in-process --block {s['block']} "
        f"--blocks {' '.join(map(str, blocks))} "
        f"--warm {s['warm']} --num {s['num']} --presets {' '.join(s['presets'])}"
    )


def main_in_process(args: argparse.Namespace, results: dict) -> None:
    blocks = blocks_per_preset(args.blocks, args.presets)
    file = Path(args.out) / "overhead_in_process.json"
    if args.update and file.is_file():
        # More pairs for some presets: their rows are replaced, the others' kept, and each row
        # keeps the command and load of the run that made it.
        earlier = json.loads(file.read_text())
        for row in earlier["presets"].values():
            row.setdefault("command", in_process_command(earlier["settings"]))
            row.setdefault("load_before", earlier["machine"]["load_before"])
            row.setdefault("load_after", earlier["machine"]["load_after"])
        results["presets"] = earlier["presets"]
    command = in_process_command(results["settings"])
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.data_cache or Path(tmp) / "data")
        for preset in args.presets:
            # The preset's own schedule, logging and checkpoint interval.
            opts = [f"data.cache={cache}", f"data.num={args.num}", *args.extra]
            n = blocks[preset]
            load_before = round(os.getloadavg()[0], 2)
            times = in_process(preset, opts, args.block, n, args.warm, Path(tmp) / preset)
            batch = times["batch_size"]
            must, bare = times["must_seconds"], times["bare_seconds"]
            ratio = ratio_interval(must, bare)
            load = round(os.getloadavg()[0], 2)
            results["presets"][preset] = {
                **times,
                "command": command,
                "load_before": load_before,
                "load_after": load,
                "blocks": n,
                "must_images_per_s": batch * args.block * len(must) / sum(must),
                "bare_images_per_s": batch * args.block * len(bare) / sum(bare),
                "pair_ratios": spread([b / m for m, b in zip(must, bare, strict=True)]),
                **ratio,
            }
            print(
                f"{preset}: must / bare {ratio['ratio']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"
            )
    results["machine"]["load_after"] = round(os.getloadavg()[0], 2)
    write_results(args.out, "overhead_in_process", results, report_in_process(results))


def report_in_process(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    commands = list(dict.fromkeys(r.get("command") for r in results["presets"].values()))
    if commands == [None]:  # one run made every row
        commands = [in_process_command(results["settings"])]
    ran = (
        f"load average {m['load_before']} before, {m['load_after']} after. "
        f"Command: `{commands[0]}`."
        if len(commands) == 1
        else "rows from "
        + "; ".join(f"`{c}`" for c in commands)
        + " (`--update`: each later run replaced its presets' rows; load averages per row "
        "in the JSON)."
    )
    lines = [
        "# Framework overhead per step: `must teach` and a bare loop interleaved in one process",
        "",
        f"Machine: {m['cpus']} CPUs ({m['threads']} torch threads), Python {m['python']}, torch "
        f"{m['torch']}; {ran}",
        f"`must teach` runs in the benchmark's process with its progress bar, logging and "
        f"periodic checkpoints as the preset sets them (validation only at the end). After "
        f"{s['warm']} untimed steps, a callback stops its clock every {s['block']} steps, runs "
        f"{s['block']} steps of the bare loop (same model, data, loader, optimizer, schedule, "
        f"clipping and precision, its own copy) on a clock of its own, and restarts the "
        f"Lightning clock: pairs of blocks, seconds apart, so the drift of the "
        "machine's speed (which made separate processes differ by up to 30%, see "
        "`overhead.md`) reaches both alike.",
        "Ratio: must images/s over bare images/s (bare seconds over must seconds, summed over "
        "the pairs), with a 95% bootstrap interval over the pairs; a verdict only where the "
        "interval lies on one side of 0.95. Outside training: the run's seconds outside its "
        "training clock, in this process (data, model, trainer set-up, the test pass, the model "
        "file); a run in a process of its own also starts Python and imports the libraries "
        "(`overhead.md`'s fixed cost), which `must run` does once for all its runs.",
        "",
        "| preset | must (images/s) | bare (images/s) | must / bare, 95% interval (target ≥ 0.95) "
        "| pairs | per-pair ratios, median [min, max] | outside training (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for preset, r in results["presets"].items():
        verdict = target_verdict(r["low"], r["high"], "undecided")
        p = r["pair_ratios"]
        lines.append(
            f"| {preset} | {r['must_images_per_s']:.1f} | {r['bare_images_per_s']:.1f} "
            f"| {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}] ({verdict}) "
            f"| {len(r['must_seconds'])} | {p['median']:.3f} [{p['min']:.3f}, {p['max']:.3f}] "
            f"| {_seconds(r.get('outside_training_seconds'))} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"  # older files did not record it


def report(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    command = f"python benchmarks/overhead.py --steps {s['steps']} --pairs {s['pairs']} " + (
        f"--num {s['num']} --worker-pairs {s['worker_pairs']} --presets {' '.join(s['presets'])}"
    )
    if s["extra"]:
        command += " " + " ".join(s["extra"])
    lines = [
        "# Framework overhead: `must teach` against a bare PyTorch loop",
        "",
        f"Machine: {m['cpus']} CPUs ({m['threads']} torch threads), Python {m['python']}, torch "
        f"{m['torch']}; load average {m['load_before']} before, {m['load_after']} after. "
        f"Command: `{command}`.",
        f"Each run trains {s['steps']} steps, validates once and saves its checkpoints; "
        f"{s['pairs']} interleaved pairs (must, bare) per preset, each run a fresh process. "
        "Ratio: `must teach` images/s over the bare loop's, per pair; median [min, max]. A "
        "verdict needs every pair on one side of 0.95.",
        "",
        "| preset | must (images/s) | bare (images/s) | must / bare (target ≥ 0.95) "
        "| fixed cost per run (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for preset, r in results["presets"].items():
        ratio = r["ratio"]
        # A verdict only where every pair agrees; otherwise the spread decides nothing.
        verdict = target_verdict(ratio["min"], ratio["max"], "undecided: the pairs straddle 0.95")
        lines.append(
            f"| {preset} | {r['must_images_per_s']['median']:.1f} "
            f"| {r['bare_images_per_s']['median']:.1f} "
            f"| {ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}] ({verdict}) "
            f"| {r['fixed_seconds']['median']:.1f} |"
        )
    if any(r["workers"] for r in results["presets"].values()):
        lines += [
            "",
            "## Loading in the training process against one loader worker",
            "",
            "`must teach` with `data.num_workers=0` and `=1`, interleaved pairs; ratio: images/s "
            "with one worker over in-process, median [min, max].",
            "",
            "| preset | in-process (images/s) | one worker (images/s) | one worker / in-process |",
            "|---|---:|---:|---:|",
        ]
        for preset, r in results["presets"].items():
            if not r["workers"]:
                continue
            ratio = spread([w["ratio"] for w in r["workers"]])
            w0 = spread([w["w0"]["images_per_s"] for w in r["workers"]])["median"]
            w1 = spread([w["w1"]["images_per_s"] for w in r["workers"]])["median"]
            lines.append(
                f"| {preset} | {w0:.1f} | {w1:.1f} "
                f"| {ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}] |"
            )
    lines += [
        "",
        "Fixed cost: the `must teach` process's wall time minus its training clock (start-up and "
        "imports, reading the cached dataset, the test pass, writing the model file).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
