"""``must label show`` and ``must label stats``: look at a pseudo-label store.

``show_store`` draws a grid, one row per image: the image with its boxes and class names, the
class map (ignored pixels black), depth (near is bright), and a text panel with the key, the
top-3 classes and where each label came from. ``store_stats`` gathers per-task statistics
(boxes per image, scores, ignored pixels, entropy, label origins, skipped images);
``format_stats`` prints them.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.utils import make_grid

from must.data.show import sample_panels, text_panel
from must.store import PseudoLabelStore
from must.store.dataset import ORIGIN_KEY, StoreDataset
from must.tasks.classification import SOFT_KEY

BOX_BINS = (0, 1, 2, 3, 4, 5, 10)  # boxes per image: 0, 1, 2, 3, 4, 5-9, 10+
SCORE_BINS = 10  # score histogram over [0, 1]


def _evenly(count: int, num: int) -> list[int]:
    num = max(0, min(num, count))
    return sorted({math.floor(i * count / num) for i in range(num)}) if num else []


def show_store(
    store_root: str | Path,
    out: str | Path | None = None,
    num: int = 8,
    *,
    image_root: str | Path | None = None,
) -> Path:
    """Write a PNG grid of ``num`` images (evenly spread over the store) with their labels."""
    dataset = StoreDataset(store_root, image_root=image_root, allow_incomplete=True)
    out = Path(out) if out is not None else Path(store_root) / "preview.png"
    panels = []
    names = dataset.classes.get("classification", [])
    for index in _evenly(len(dataset), num):
        sample = dataset[index]
        image, seg, depth, _ = sample_panels(sample, dataset.classes)
        lines = [sample["key"]]
        if SOFT_KEY in sample:
            probs = np.asarray(sample[SOFT_KEY], np.float64)
            for c in np.argsort(-probs, kind="stable")[:3]:
                lines.append(f"{names[c] if c < len(names) else c}: {probs[c]:.2f}")
        if "boxes" in sample:
            lines.append(f"boxes: {len(sample['boxes'])}")
        for task, origin in sample[ORIGIN_KEY].items():
            lines.append(f"{task}: {origin}")
        panels += [image, seg, depth, text_panel(lines, *image.shape[-2:])]
    if not panels:
        raise ValueError(f"{store_root}: the store has no labelled image to show")
    grid = make_grid(panels, nrow=4, padding=2, pad_value=255)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out


def _histogram(values: np.ndarray, edges: list[float]) -> list[int]:
    counts, _ = np.histogram(values, bins=edges)
    return [int(c) for c in counts]


def store_stats(store_root: str | Path) -> dict[str, Any]:
    """Per-task statistics of a store (complete or not: the shards written so far).

    classification: mean entropy (nats) of the stored distributions, mean top probability;
    detection: boxes per image (mean, histogram), score histogram (pseudo labels);
    segmentation: fraction of ignored pixels (pseudo labels, pooled); depth: range and mean;
    every task: label origins (pseudo / real). Plus the skipped images with their reasons.
    """
    store = PseudoLabelStore(store_root, allow_incomplete=True)
    origins: dict[str, dict[str, int]] = {t: {"pseudo": 0, "real": 0} for t in store.tasks}
    for shard in store.manifest["shards"]:
        for task, counts in shard["labels"].items():
            for origin, n in counts.items():
                origins[task][origin] += n
    acc: dict[str, dict[str, Any]] = {t: {} for t in store.tasks}
    entropy, top, boxes, scores = [], [], [], []
    ignored = total_px = 0
    depth_sum = depth_n = depth_invalid = depth_px = 0.0
    depth_lo, depth_hi = math.inf, -math.inf
    for key in store.keys:
        record = store.get(key)
        for task, fields in record.labels.items():
            kind = store.kind(task)
            pseudo = record.origin[task] == "pseudo"
            if kind == "classification":
                p = fields["cls_probs"].astype(np.float64)
                entropy.append(float(-(p[p > 0] * np.log(p[p > 0])).sum()))
                top.append(float(p.max()))
            elif kind == "detection":
                boxes.append(len(fields["det_classes"]))
                if pseudo:
                    scores.append(fields["det_scores"].astype(np.float32))
            elif kind == "segmentation" and pseudo:
                seg = fields["seg_map"]
                ignored += int((seg == 255).sum())
                total_px += seg.size
            elif kind == "depth":
                d = fields["depth"].astype(np.float64)
                valid = d > 0
                depth_px += d.size
                depth_invalid += d.size - int(valid.sum())
                if valid.any():
                    depth_sum += float(d[valid].sum())
                    depth_n += int(valid.sum())
                    depth_lo = min(depth_lo, float(d[valid].min()))
                    depth_hi = max(depth_hi, float(d[valid].max()))
    for task in store.tasks:
        kind = store.kind(task)
        out = acc[task]
        out["kind"] = kind
        out["origins"] = origins[task]
        if kind == "classification":
            k = len(store.classes(task) or [])
            out["images"] = len(entropy)
            out["entropy_mean"] = float(np.mean(entropy)) if entropy else None
            out["entropy_max"] = math.log(k) if k else None
            out["top_prob_mean"] = float(np.mean(top)) if top else None
        elif kind == "detection":
            b = np.asarray(boxes, np.int64)
            out["images"] = len(b)
            out["boxes"] = int(b.sum())
            out["boxes_per_image_mean"] = float(b.mean()) if len(b) else None
            edges = [*BOX_BINS, math.inf]
            out["boxes_per_image_hist"] = {
                (
                    f"{lo}" if hi - lo == 1 else f"{lo}+" if hi == math.inf else f"{lo}-{hi - 1}"
                ): int(((b >= lo) & (b < hi)).sum())
                for lo, hi in itertools.pairwise(edges)
            }
            s = np.concatenate(scores) if scores else np.zeros(0, np.float32)
            out["score_hist_edges"] = [i / SCORE_BINS for i in range(SCORE_BINS + 1)]
            out["score_hist"] = _histogram(s, out["score_hist_edges"])
            out["score_mean"] = float(s.mean()) if s.size else None
        elif kind == "segmentation":
            out["pixels"] = total_px
            out["ignored_fraction"] = ignored / total_px if total_px else None
        elif kind == "depth":
            out["pixels"] = int(depth_px)
            out["invalid_fraction"] = depth_invalid / depth_px if depth_px else None
            out["mean_m"] = depth_sum / depth_n if depth_n else None
            out["min_m"] = depth_lo if depth_n else None
            out["max_m"] = depth_hi if depth_n else None
    return {
        "store": str(store.root),
        "complete": bool(store.manifest["complete"]),
        "images": store.manifest["images"]["count"],
        "records": len(store),
        "settings": store.settings,
        "tasks": acc,
        "skipped": list(store.skipped),
    }


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"store {stats['store']}: {stats['records']} labelled of {stats['images']} images, "
        f"{len(stats['skipped'])} skipped, {'complete' if stats['complete'] else 'INCOMPLETE'}",
        "settings: " + ", ".join(f"{k}={v}" for k, v in stats["settings"].items()),
    ]
    for task, s in stats["tasks"].items():
        o = s["origins"]
        lines.append(f"{task} ({s['kind']}): {o['pseudo']} pseudo, {o['real']} real")
        if s["kind"] == "classification":
            lines.append(
                f"  entropy mean {_f(s['entropy_mean'])} nats (max {_f(s['entropy_max'])}), "
                f"top probability mean {_f(s['top_prob_mean'])}"
            )
        elif s["kind"] == "detection":
            hist = ", ".join(f"{k}: {v}" for k, v in s["boxes_per_image_hist"].items())
            lines.append(
                f"  boxes per image mean {_f(s['boxes_per_image_mean'], 2)} ({s['boxes']} boxes)"
            )
            lines.append(f"  boxes per image histogram: {hist}")
            edges = s["score_hist_edges"]
            scores = ", ".join(
                f"[{edges[i]:.1f},{edges[i + 1]:.1f}{']' if i == len(edges) - 2 else ')'}: {n}"
                for i, n in enumerate(s["score_hist"])
                if n
            )
            lines.append(f"  score histogram (pseudo): {scores or 'no boxes'}")
        elif s["kind"] == "segmentation":
            lines.append(
                f"  ignored pixels (pseudo): {_f(s['ignored_fraction'])} of {s['pixels']} pixels"
            )
        elif s["kind"] == "depth":
            lines.append(
                f"  depth mean {_f(s['mean_m'], 2)} m, range [{_f(s['min_m'], 2)}, "
                f"{_f(s['max_m'], 2)}] m, invalid fraction {_f(s['invalid_fraction'])}"
            )
    for item in stats["skipped"][:20]:
        lines.append(f"skipped {item['key']} ({item['path']}): {item['reason']}")
    if len(stats["skipped"]) > 20:
        lines.append(f"... and {len(stats['skipped']) - 20} more skipped")
    return "\n".join(lines)
