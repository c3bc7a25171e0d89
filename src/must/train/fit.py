"""Fit a module with Lightning's Trainer: checkpoints every N steps and at the end, resume
from the last checkpoint, best-on-validation selection, CSV (and TensorBoard) logs, a
progress bar, mixed precision on GPUs, DDP through the trainer's launcher or torchrun."""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from must.config import TrainConfig
from must.train.module import MultiTaskModule

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"


def resolve_precision(cfg: TrainConfig) -> str:
    """``auto``: bf16 (or fp16) mixed precision on a GPU, fp32 on a CPU.

    CPU bf16 autocast is twice as fast on CPUs with AVX-512 BF16/AMX, but it gave sporadic
    NaN losses in the pixel heads here (not reproducible run to run), so it stays opt-in."""
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _quiet_lightning() -> None:
    # Lightning's start-up tips (litlogger, num_workers, ...) drown the progress bar on CPUs.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LitLogger.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
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
    loggers = [CSVLogger(out_dir, name="logs", version="")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(out_dir, name="tensorboard", version=""))
    callbacks = [periodic, best] if select_best else [periodic]
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


def fit_and_test(
    module: MultiTaskModule,
    train_loader: DataLoader,
    val_loader: DataLoader,
    test_loader: DataLoader | None,
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool = True,
) -> dict:
    """Train (resuming from ``checkpoints/last.ckpt`` when present), reload the checkpoint
    with the best validation score, and evaluate it on validation and test data."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = make_trainer(cfg, out_dir, progress)
    last = out_dir / CHECKPOINT_DIR / LAST
    resumed_from = None
    if last.exists():
        resumed_from = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if last.exists() else None)
    train_seconds = time.perf_counter() - start
    best = out_dir / CHECKPOINT_DIR / BEST
    if best.exists():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    # The best weights were validated when they were saved (in this process): reuse that.
    saved = next(
        (c.saved_metrics for c in trainer.callbacks if isinstance(c, _BestCheckpoint)), None
    )
    if saved is None or not best.exists():
        trainer.validate(module, val_loader, verbose=False)
        saved = module.last_validation
    val_metrics = dict(saved)
    steps_run = int(trainer.global_step) - (resumed_from or 0)
    world = int(trainer.world_size)
    images = steps_run * int(train_loader.batch_size or 0) * world
    images_per_second = images / train_seconds if train_seconds > 0 else 0.0
    print(f"trained {steps_run} steps in {train_seconds:.1f} s: {images_per_second:.1f} images/s")
    test_metrics = {}
    if not test_loader:  # None, or no loader (no dataset has a 'test' split)
        test_loader = None
        print("no 'test' split: no test metrics (validation metrics are on the 'val' split)")
    if test_loader is not None:
        trainer.test(module, test_loader, verbose=False)
        test_metrics = dict(module.last_test)
    return {
        "val": val_metrics,
        "test": test_metrics,
        "train_seconds": round(train_seconds, 1),
        "images_per_second": round(images_per_second, 2),
        "steps": int(trainer.global_step),
        "resumed_from_step": resumed_from,
        "best_checkpoint": best.name if best.exists() else LAST,
        "precision": resolve_precision(cfg),
    }
