"""Fit a module with Lightning's Trainer: checkpoints every N steps and at the end, resume
from the last checkpoint, best-on-validation selection, CSV (and TensorBoard) logs, a
progress bar, mixed precision on GPUs, DDP through the trainer's launcher or torchrun.
After a multi-process fit only global rank 0 goes on (``end_other_processes``).

Resuming keeps the history: ``logs/metrics.csv`` keeps the rows logged before the resume point
and the new ones are appended, and the training time is carried in the checkpoint. Checkpoints
are only ever read with ``weights_only=True``. SIGINT/SIGTERM stop training at the next batch
with the last checkpoint intact (re-running resumes from it)."""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from must.checkpoint import torch_load
from must.config import TrainConfig
from must.errors import ConfigError, MustError
from must.records import save_records
from must.training.module import MultiTaskModule, NonFiniteLossError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"
TEST_RECORDS = "test_records"  # per-image records of the test pass, one file per task
# Python objects our Lightning checkpoints may name beyond tensors and plain values. Found by
# loading teacher, student (with learnt loss weights) and SimCLR checkpoints with
# weights_only=True: none is needed. Anything else a checkpoint names is refused.
CHECKPOINT_GLOBALS: list[Any] = []


class TrainingInterrupted(MustError):
    """SIGINT or SIGTERM stopped training; the last checkpoint is kept for resuming."""


def read_checkpoint(file: Path, restart_hint: bool = True) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True`` (tensors mapped, not copied)."""
    with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
        try:
            ckpt = torch_load(file, "checkpoint", mmap=True)
        except ConfigError as err:
            if not restart_hint:
                raise
            raise ConfigError(
                f"{err}; delete {file.parent} to restart this run from the beginning"
            ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{file}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def resume_point(out_dir: Path) -> tuple[Path | None, int]:
    """(``last.ckpt`` or None, its global step). The metrics.csv rows of steps from that one on
    (logged as step - 1) are logged again after resuming."""
    last = out_dir / CHECKPOINT_DIR / LAST
    if not last.exists():
        return None, 0
    return last, int(read_checkpoint(last).get("global_step", 0))


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps its rows logged
    before ``keep_before`` (a resumed run logs the later ones again) and appends."""

    def __init__(self, log_dir: str, keep_before: int) -> None:
        self.keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _step(r) < self.keep_before]
        if not rows:
            path.unlink()
            return
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(keys)


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the history of earlier invocations (see ``_AppendingWriter``)."""

    def __init__(self, *args: Any, keep_before: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_before = keep_before

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._keep_before)
        return self._experiment


class TrainClock(Callback):
    """Seconds spent training, summed over invocations (kept in the checkpoints)."""

    def __init__(self) -> None:
        self.before = 0.0
        self.started: float | None = None
        self.stopped: float | None = None

    def seconds(self) -> float:
        if self.started is None:
            return self.before
        return self.before + (self.stopped or time.perf_counter()) - self.started

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started, self.stopped = time.perf_counter(), None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stopped = time.perf_counter()

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("seconds", 0.0))


class StopOnSignal(Callback):
    """Turns SIGINT/SIGTERM into a stop at the next batch boundary: the step in flight ends,
    nothing more is saved, and ``TrainingInterrupted`` names the checkpoint to resume from.
    (Lightning's own SIGTERM handling, which also runs, exits with status 0 and no word.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.received = signum

    def check(self, trainer: L.Trainer) -> None:
        if self.received is not None:
            raise TrainingInterrupted(
                f"{signal.Signals(self.received).name} received: training stopped at step "
                f"{trainer.global_step}; {kept_checkpoint(self.out_dir)}"
            )

    # Checked before a batch, so the previous one is complete: logged and, when due, saved.
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.check(trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.check(trainer)


def kept_checkpoint(out_dir: Path) -> str:
    """What a stopped run leaves to resume from, in words."""
    last = out_dir / CHECKPOINT_DIR / LAST
    if not last.exists():
        return "no checkpoint was saved yet (re-running starts from the beginning)"
    step = int(read_checkpoint(last, restart_hint=False)["global_step"])
    return f"the last checkpoint, {last} (step {step}), is kept: re-running resumes from it"


def fit(trainer: L.Trainer, module: L.LightningModule, out_dir: Path, *loaders: Any) -> int | None:
    """``trainer.fit``, resuming from ``last.ckpt`` when present (read with
    ``weights_only=True``); returns the step resumed from, or None."""
    last, step = resume_point(out_dir)
    stopper = next(c for c in trainer.callbacks if isinstance(c, StopOnSignal))
    stopper.install()
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            trainer.fit(module, *loaders, ckpt_path=str(last) if last else None, weights_only=True)
        stopper.check(trainer)  # a signal during the final steps still stops the run
    except SIGTERMException:  # Lightning's own stop (it exits with status 0): say why instead
        stopper.check(trainer)
        raise
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err}; {kept_checkpoint(out_dir)}") from None
    finally:
        stopper.restore()
    return step if last else None


def train_seconds(trainer: L.Trainer) -> float:
    clock = next(c for c in trainer.callbacks if isinstance(c, TrainClock))
    return round(clock.seconds(), 1)


CPU_BF16_ENV = "MUST_CPU_BF16"  # "0" or "1": overrides the detection below (the tests pin 0)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX tiles). Without either,
    oneDNN emulates bf16 and a training step is slower than in fp32. ``MUST_CPU_BF16=0`` or
    ``1`` in the environment overrides the answer."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ConfigError(f"{CPU_BF16_ENV}={forced!r} in the environment: use 0 or 1")
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(cfg: TrainConfig) -> str:
    """``auto``: bf16 (or fp16) mixed precision on a GPU; on a CPU, bf16 mixed precision where
    the CPU computes bf16 in hardware, else fp32.

    With native bf16 a CPU training step ran 1.27-1.50x the fp32 rate on every CPU preset
    (benchmarks/results/precision_native_bf16.md) and the teachers trained in bf16 tested
    within the difference between two fp32 seeds (precision_quality.md); without it a step
    ran at 0.59-0.70x (precision.md). Its old sporadic NaN losses came from a oneDNN bf16 conv gradient bug, now
    worked around (docs/training.md, "Mixed precision")."""
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if native_cpu_bf16() else "32-true"


def _quiet_lightning() -> None:
    # Lightning's start-up tips (litlogger, num_workers, ...) drown the progress bar on CPUs.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LitLogger.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    # Our metrics are torchmetrics objects: under DDP they sync across processes when computed.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
    # A probe keeps its frozen backbone in eval mode on purpose (batch-norm statistics fixed).
    warnings.filterwarnings("ignore", message=".*module.s. in eval mode at the start of training.*")


class _BestCheckpoint(ModelCheckpoint):
    """Also keeps the validation metrics of the weights it saved, so the final evaluation
    need not validate the same weights a second time."""

    saved_metrics: dict | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.saved_metrics = dict(trainer.lightning_module.last_validation)


def make_trainer(
    cfg: TrainConfig, out_dir: Path, progress: bool = True, select_best: bool = True
) -> L.Trainer:
    _quiet_lightning()
    ckpt_dir = out_dir / CHECKPOINT_DIR
    periodic = ModelCheckpoint(
        dirpath=ckpt_dir,
        every_n_train_steps=cfg.checkpoint_every,
        save_top_k=0,
        save_last=True,
    )
    best = _BestCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor="val/score", mode="max", save_top_k=1
    )
    _, resume_step = resume_point(out_dir)
    # Rows are written at each checkpoint, so a killed run loses none it will not redo.
    flush = cfg.checkpoint_every
    loggers = [
        HistoryCSVLogger(
            out_dir,
            name="logs",
            version="",
            keep_before=resume_step,
            flush_logs_every_n_steps=flush,
        )
    ]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(out_dir, name="tensorboard", version=""))
    callbacks = [periodic, best] if select_best else [periodic]
    callbacks += [TrainClock(), StopOnSignal(out_dir)]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=5))
    return L.Trainer(
        max_steps=cfg.max_steps,
        max_epochs=-1,
        val_check_interval=cfg.val_every if select_best else None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        # Heads that skip pyramid levels (a P2-P4 detector) leave some backbone weights
        # without gradients, which plain DDP refuses.
        strategy="ddp_find_unused_parameters_true" if cfg.strategy == "ddp" else cfg.strategy,
        precision=resolve_precision(cfg),
        gradient_clip_val=cfg.grad_clip,
        log_every_n_steps=cfg.log_every,
        callbacks=callbacks,
        logger=loggers,
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )


def end_other_processes(trainer: L.Trainer) -> bool:
    """After ``fit`` under a multi-process strategy: every process waits for the others, the
    process group is torn down, and only global rank 0 goes on (True there, False in the
    others, which are done). So whatever follows (evaluation, files, printing) happens once,
    and metrics no longer sync across processes. A single process: True, nothing changes."""
    if trainer.world_size == 1:
        return True
    trainer.strategy.barrier("fit done")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return trainer.is_global_zero


def _single_process_trainer(cfg: TrainConfig, device: torch.device, progress: bool) -> L.Trainer:
    """A trainer for rank 0 alone on ``device``: no distributed sampler, so every image of a
    split is evaluated exactly once (DDP's sampler pads a split with repeated images)."""
    return L.Trainer(
        accelerator=device.type,
        strategy=SingleDeviceStrategy(device),
        precision=resolve_precision(cfg),
        callbacks=[TQDMProgressBar(refresh_rate=5)] if progress else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )


def fit_and_test(
    module: MultiTaskModule,
    train_loader: DataLoader,
    val_loader: DataLoader,
    test_loader: DataLoader | None,
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool = True,
) -> dict | None:
    """Train (resuming from ``checkpoints/last.ckpt`` when present), reload the checkpoint
    with the best validation score, and evaluate it on validation and test data.

    Under a multi-process strategy the processes other than global rank 0 return None once
    training is over; rank 0 evaluates the whole splits alone (see ``end_other_processes``)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = make_trainer(cfg, out_dir, progress)
    resumed_from = fit(trainer, module, out_dir, train_loader, val_loader)
    world_size, device = int(trainer.world_size), trainer.strategy.root_device
    if not end_other_processes(trainer):
        return None
    seconds = train_seconds(trainer)
    best = out_dir / CHECKPOINT_DIR / BEST
    if best.exists():
        module.load_state_dict(read_checkpoint(best, restart_hint=False)["state_dict"])
    # The best weights were validated when they were saved (in this process): reuse that,
    # unless several processes validated them on padded shares of the split.
    saved = next(
        (c.saved_metrics for c in trainer.callbacks if isinstance(c, _BestCheckpoint)), None
    )
    evaluator = trainer if world_size == 1 else _single_process_trainer(cfg, device, progress)
    if saved is None or not best.exists() or world_size > 1:
        evaluator.validate(module, val_loader, verbose=False)
        saved = module.last_validation
    val_metrics = dict(saved)
    steps_run = int(trainer.global_step) - (resumed_from or 0)
    images = steps_run * int(train_loader.batch_size or 0) * world_size  # every process's
    clock = next(c for c in trainer.callbacks if isinstance(c, TrainClock))
    run_seconds = clock.seconds() - clock.before  # this invocation only
    images_per_second = images / run_seconds if run_seconds > 0 else 0.0
    print(f"trained {steps_run} steps in {run_seconds:.1f} s: {images_per_second:.1f} images/s")
    test_metrics = {}
    if not test_loader:  # None, or no loader (no dataset has a 'test' split)
        test_loader = None
        print("no 'test' split: no test metrics (validation metrics are on the 'val' split)")
    # Records of an earlier evaluation of this folder never outlive it.
    shutil.rmtree(out_dir / TEST_RECORDS, ignore_errors=True)
    test_records = {}
    if test_loader is not None:
        evaluator.test(module, test_loader, verbose=False)
        test_metrics = dict(module.last_test)
        test_records = save_test_records(module, out_dir)
    return {
        "val": val_metrics,
        "test": test_metrics,
        "train_seconds": seconds,
        "images_per_second": round(images_per_second, 2),
        "steps": int(trainer.global_step),
        "resumed_from_step": resumed_from,
        "best_checkpoint": best.name if best.exists() else LAST,
        "precision": resolve_precision(cfg),
        "test_records": test_records,
    }


def save_test_records(module: MultiTaskModule, out_dir: Path) -> dict[str, str]:
    """Write each task's per-image records of the last test pass to
    ``TEST_RECORDS/<task>.npz`` (``must.records``); returns task -> path under ``out_dir``."""
    written = {}
    for name, pairs in module.test_records.items():
        if not pairs:
            continue
        task = module.model.tasks[name]
        relative = f"{TEST_RECORDS}/{name}.npz"
        keys = [key for key, _ in pairs]
        save_records(out_dir / relative, name, task.primary_metric, keys, [r for _, r in pairs])
        written[name] = relative
    return written
