"""CPU training step in fp32 against bf16 autocast, per CPU preset, side by side in one run.

For each CPU preset (``teach_*_cpu`` and the student ``train_student_cpu``): the preset's
model with random weights, at its batch size and image size, on one batch of rendered images
(a teacher: its style with its labels; the student: the mixed pool with all four labels, as
pseudo labels give every image). A step is what the trainer runs: forward (under
``torch.autocast("cpu", dtype=torch.bfloat16)`` for bf16), backward, gradient clipping at the
preset's ``grad_clip``, optimizer step (the preset's optimizer). Two copies of one model, one
per precision, alternate A, B, A, B: ``--pairs`` pairs of ``--steps`` timed steps each, after
``--warmup`` untimed steps of each. Reported per preset: median images/s of each precision,
the bf16/fp32 ratio of each pair (median, min-max), and whether every bf16 loss was finite.

``--check-steps K`` trains each preset K steps in bf16 from a fixed seed on rendered data
(a new augmented batch every step, as training sees them) and reports the first step whose
loss or gradient is non-finite, if any.

    python benchmarks/precision.py --out benchmarks/results [--pairs 3] [--steps 5]
    python benchmarks/precision.py --check-steps 200 --presets teach_depth_cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from must.config import StudentConfig, TeachConfig, load_config
from must.data.readers import MultiTaskDataset
from must.data.render import render_dataset
from must.data.transforms import build_transforms
from must.models.model import MultiTaskModel
from must.tasks import build_task
from must.tasks.base import Batch
from must.training.data import Collator
from must.training.module import optimizer_and_schedule

PRESETS = (
    "teach_classification_cpu",
    "teach_detection_cpu",
    "teach_segmentation_cpu",
    "teach_depth_cpu",
    "train_student_cpu",
)
STUDENT_TASKS = ("classification", "detection", "segmentation", "depth")


class Preset:
    """A preset's model, training settings and rendered data (``num`` images)."""

    def __init__(self, name: str, root: Path, num: int) -> None:
        self.name = name
        if name.startswith("train_student"):
            cfg = load_config(StudentConfig, name)
            style, tasks, size = "mixed", STUDENT_TASKS, cfg.data.image_size
            render_size = size
        else:
            cfg = load_config(TeachConfig, name)
            style, tasks, size = cfg.data.dataset, (cfg.task,), cfg.data.image_size
            render_size = cfg.data.render_size
        self.model_cfg, self.train_cfg, self.image_size = cfg.model, cfg.train, size
        folder = root / f"{style}_n{num}_px{render_size}"
        render_dataset(
            style, folder, num, render_size, splits=(1, 0, 0), tasks=list(tasks),
            workers=min(2, os.cpu_count() or 1), progress=False,
        )  # fmt: skip
        self.dataset = MultiTaskDataset(folder, split="train")
        self.dataset.transform = build_transforms(True, size)
        self.tasks = {
            t: build_task(t, self.dataset.classes.get(t) or None, cfg.model.heads.get(t))
            for t in tasks
        }

    def model(self, seed: int) -> MultiTaskModel:
        torch.manual_seed(seed)
        return MultiTaskModel(self.model_cfg.backbone, self.tasks).train()

    def batch(self, seed: int) -> Batch:
        torch.manual_seed(seed)
        samples = [self.dataset[i % len(self.dataset)] for i in range(self.train_cfg.batch_size)]
        return Collator(self.tasks)(samples)

    def loader(self, seed: int) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.train_cfg.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=Collator(self.tasks),
            generator=torch.Generator().manual_seed(seed),
        )


class Trainer:
    """One model and its optimizer; :meth:`step` is one training step in one precision."""

    def __init__(self, model: MultiTaskModel, preset: Preset, bf16: bool) -> None:
        self.model, self.bf16, self.clip = model, bf16, preset.train_cfg.grad_clip
        self.grad_norm = 0.0  # the last step's gradient norm (before clipping), if checked
        self.opt = optimizer_and_schedule(model.parameters(), preset.train_cfg)["optimizer"]

    def step(self, batch: Batch, check_grads: bool = False) -> tuple[dict[str, float], str | None]:
        """Loss per task and, with ``check_grads``, the first parameter whose gradient is
        non-finite (None: none, or not checked)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            _, losses = self.model(batch.images, batch.targets)
        per_task = {name: sum(terms.values()) for name, terms in losses.items()}
        self.opt.zero_grad(set_to_none=True)
        sum(per_task.values()).backward()
        bad_grad = None
        if check_grads:
            bad_grad = next(
                (
                    n
                    for n, p in self.model.named_parameters()
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())
                ),
                None,
            )
            self.grad_norm = float(
                torch.nn.utils.get_total_norm(
                    [p.grad for p in self.model.parameters() if p.grad is not None]
                )
            )
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return {name: float(v.detach()) for name, v in per_task.items()}, bad_grad


def all_finite(losses: dict[str, float]) -> bool:
    return all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def timed(trainer: Trainer, batch: Batch, steps: int) -> tuple[float, bool]:
    """Images/s over ``steps`` steps and whether every loss was finite (the trainer checks
    each step's loss too)."""
    finite = True
    start = time.perf_counter()
    for _ in range(steps):
        losses, _ = trainer.step(batch)
        finite = finite and all_finite(losses)
    return steps * len(batch.keys) / (time.perf_counter() - start), finite


def compare(preset: Preset, pairs: int, steps: int, warmup: int, seed: int) -> dict:
    model = preset.model(seed)
    fp32 = Trainer(model, preset, bf16=False)
    bf16 = Trainer(copy.deepcopy(model), preset, bf16=True)
    batch = preset.batch(seed)
    for trainer in (fp32, bf16):  # first calls pay for kernel selection and allocation
        timed(trainer, batch, warmup)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    bf16_finite = True
    for _ in range(pairs):
        rates["fp32"].append(timed(fp32, batch, steps)[0])
        rate, finite = timed(bf16, batch, steps)
        rates["bf16"].append(rate)
        bf16_finite = bf16_finite and finite
    ratios = [b / a for a, b in zip(rates["fp32"], rates["bf16"], strict=True)]
    result = {
        "batch_size": preset.train_cfg.batch_size,
        "image_size": preset.image_size,
        "tasks": list(preset.tasks),
        "fp32_images_per_s": statistics.median(rates["fp32"]),
        "bf16_images_per_s": statistics.median(rates["bf16"]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds": rates,
        "ratios": ratios,
        "bf16_finite": bf16_finite,
    }
    print(
        f"{preset.name}: fp32 {result['fp32_images_per_s']:.1f} images/s, bf16 "
        f"{result['bf16_images_per_s']:.1f} images/s, bf16/fp32 {result['ratio_median']:.2f} "
        f"({result['ratio_min']:.2f}-{result['ratio_max']:.2f}); bf16 finite: {bf16_finite}"
    )
    return result


def check(preset: Preset, steps: int, seed: int) -> dict:
    """K bf16 training steps on new batches; the first non-finite loss or gradient, and the
    largest gradient norm (a wrong but finite gradient shows as an absurd norm)."""
    trainer = Trainer(preset.model(seed), preset, bf16=True)
    torch.manual_seed(seed)  # the augmentation's draws
    done, first, norms = 0, None, []
    while done < steps and first is None:
        for batch in preset.loader(seed + done):
            losses, bad_grad = trainer.step(batch, check_grads=True)
            if bad_grad is not None or not all_finite(losses):
                first = {"step": done, "losses": losses, "first_nonfinite_grad": bad_grad}
                break
            norms.append(trainer.grad_norm)
            done += 1
            if done == steps:
                break
    result = {
        "steps": steps,
        "steps_run": done,
        "images": len(preset.dataset),
        "nonfinite": first,
        "max_grad_norm": max(norms, default=None),
        "max_grad_norm_step": norms.index(max(norms)) if norms else None,
    }
    print(
        f"{preset.name}: {done} bf16 steps finite"
        + (f", then non-finite: {first}" if first else "")
        + f"; largest gradient norm {result['max_grad_norm']} (step {result['max_grad_norm_step']})"
    )
    return result


def cpu_model() -> str:
    """The CPU's model name and its bf16 instruction flags, as Linux lists them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if "flags" in ln), [])
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} (bf16 flags listed: {', '.join(bf16) or 'none'})"


def onednn_isa() -> str:
    """The instruction set oneDNN dispatches to, from its verbose log: bf16 is native on
    avx512_core_bf16 and AMX ("Intel AMX", "Intel AVX-512 with ... bfloat16"), emulated on
    older AVX-512, which decides what bf16 can gain."""
    code = (
        "import torch; x = torch.ones(1, 16, 4, 4, dtype=torch.bfloat16); "
        "torch.nn.functional.conv2d(x, torch.ones(16, 16, 3, 3, dtype=torch.bfloat16))"
    )
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    isa = [ln.split(",isa:", 1)[1] for ln in run.stdout.splitlines() if ",isa:" in ln]
    return isa[0] if isa else "unknown"


def command_line(args: argparse.Namespace, defaults: dict) -> str:
    """The command, with the options that differ from their defaults (folders left out: they
    say where files went, not what was measured)."""
    parts = ["python benchmarks/precision.py"]
    for key, value in vars(args).items():
        if key in ("out", "cache", "name") or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        parts += [f"{flag} {v}" for v in values]
    return " ".join(parts)


def write(results: dict, args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("precision_check" if args.check_steps else "precision")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# CPU mixed precision: fp32 against bf16 autocast"
        + (", finiteness check" if args.check_steps else ""),
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs ({m['threads']} torch threads), torch's CPU "
        f"capability {m['cpu_capability']}, oneDNN ISA {m['onednn_isa']}, "
        f"Python {m['python']}, torch {m['torch']}. Command: `{results['command']}`.",
    ]
    if args.check_steps:
        lines += [
            f"Each preset trained {args.check_steps} steps in bf16 autocast from seed "
            f"{args.seed} (random weights, the preset's batch and image size), a new augmented "
            "batch of rendered images each step; a step's gradients are checked before "
            "clipping, its losses after the forward pass.",
            "",
            "| preset | rendered images | finite steps | first non-finite | largest gradient "
            "norm (step) |",
            "|---|---:|---:|---|---:|",
        ]
        for preset, r in results["presets"].items():
            bad = r["nonfinite"]
            what = (
                "none"
                if bad is None
                else f"step {bad['step']}: gradient {bad['first_nonfinite_grad']}, "
                f"losses {bad['losses']}"
            )
            norm = r["max_grad_norm"]
            norm_text = "n/a" if norm is None else f"{norm:.3g} ({r['max_grad_norm_step']})"
            lines.append(f"| {preset} | {r['images']} | {r['steps_run']} | {what} | {norm_text} |")
    else:
        lines += [
            f"Training step (forward, backward, gradient clipping, optimizer step) at each "
            f"preset's batch and image size, random weights, one rendered batch; {args.pairs} "
            f"alternating fp32/bf16 pairs of {args.steps} steps after {args.warmup} warm-up "
            "steps of each. Ratio: bf16/fp32 images/s of each pair, median (min-max).",
            "",
            "| preset | batch x px | fp32 images/s | bf16 images/s | bf16 / fp32 | bf16 finite |",
            "|---|---|---:|---:|---:|---|",
        ]
        for preset, r in results["presets"].items():
            lines.append(
                f"| {preset} | {r['batch_size']} x {r['image_size']} | "
                f"{r['fp32_images_per_s']:.1f} | {r['bf16_images_per_s']:.1f} | "
                f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                f"{'yes' if r['bf16_finite'] else 'NO'} |"
            )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / name}.json and {out / name}.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--pairs", type=int, default=3, help="alternating fp32/bf16 pairs")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    parser.add_argument("--check-steps", type=int, default=0, help="bf16 finiteness check")
    parser.add_argument("--num", type=int, default=0, help="images rendered per preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--cache", default=None, help="render here (default: a temp folder)")
    parser.add_argument(
        "--name", default=None, help="results file name (default: precision, precision_check)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_isa": onednn_isa(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "command": command_line(args, vars(parser.parse_args([]))),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache")},
        "presets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.cache or tmp)
        for name in args.presets:
            # Timing needs one batch; the check draws new batches from a larger set.
            num = args.num or (512 if args.check_steps else 64)
            preset = Preset(name, root, num)
            results["presets"][name] = (
                check(preset, args.check_steps, args.seed)
                if args.check_steps
                else compare(preset, args.pairs, args.steps, args.warmup, args.seed)
            )
    write(results, args, Path(args.out))


if __name__ == "__main__":
    main()
