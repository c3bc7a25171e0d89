"""The pseudo-label store: round trip, atomic shards and resume, two writers, refusals, and a
reader that works without torch or the rest of the package."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import must.store.shards as shards
from must.errors import ConfigError, DataError
from must.store import PseudoLabelStore, Record, ShardWriter, keys_sha256, shard_name

CLS = ["ball", "cube", "cone", "drum", "torus"]
SEG = ["background", "floor", "wall", *CLS]
N_IMAGES, SHARD = 11, 4  # 3 shards: 4 + 4 + 3


def make_header(threshold: float = 0.5, shard_size: int = SHARD) -> dict:
    return {
        "tasks": {
            "classification": {"kind": "classification", "classes": CLS},
            "detection": {"kind": "detection", "classes": CLS},
            "segmentation": {"kind": "segmentation", "classes": SEG},
            "depth": {"kind": "depth", "classes": None, "encoding": {"scale": "metric"}},
        },
        "teachers": [
            {"path": f"teachers/{t}/model.pt", "sha256": f"{i:064x}", "tasks": [t], "classes": {}}
            for i, t in enumerate(["classification", "detection", "segmentation", "depth"])
        ],
        "settings": {"det_threshold": threshold, "seg_threshold": 0.5, "label_scale": 0.5},
        "images": {"source": "runs/pool"},
        "shard_size": shard_size,
    }


KEYS = [f"pool/{i:04d}.png" for i in range(N_IMAGES)]


def make_record(i: int, rng: np.random.Generator) -> Record:
    h, w = int(rng.integers(16, 40)), int(rng.integers(16, 40))
    lh, lw = h // 2, w // 2
    probs = rng.dirichlet(np.ones(len(CLS))).astype(np.float16)
    n = 0 if i == 1 else int(rng.integers(1, 5))  # image 1: no boxes
    xy = rng.uniform(0, min(h, w) / 2, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, min(h, w) / 2, (n, 2))], 1)
    seg = rng.integers(0, len(SEG), (lh, lw)).astype(np.uint8)
    seg[rng.random((lh, lw)) < 0.2] = 255
    labels = {
        "classification": {"cls_probs": probs},
        "detection": {
            "det_boxes": boxes.astype(np.float32),
            "det_classes": rng.integers(0, len(CLS), n).astype(np.int16),
            "det_scores": rng.uniform(0.5, 1, n).astype(np.float16),
        },
        "segmentation": {"seg_map": seg},
        "depth": {"depth": rng.uniform(0, 20, (lh, lw)).astype(np.float16)},
    }
    origin = {}
    if i % 3 == 0:  # a real class label: one-hot
        labels["classification"]["cls_probs"] = np.eye(len(CLS), dtype=np.float16)[i % len(CLS)]
        origin["classification"] = "real"
    if i == 2:
        del labels["depth"]  # this image has no depth label
    return Record(KEYS[i], h, w, labels, origin)


@pytest.fixture(scope="module")
def records() -> dict[str, Record]:
    rng = np.random.default_rng(0)
    return {r.key: r for r in (make_record(i, rng) for i in range(N_IMAGES))}


SKIPPED = {"key": KEYS[5], "path": "runs/pool/0005.png", "reason": "unreadable image"}


def shard_args(index: int, records: dict[str, Record]) -> tuple[list[Record], list[dict]]:
    keys = KEYS[index * SHARD : (index + 1) * SHARD]
    skipped = [SKIPPED] if SKIPPED["key"] in keys else []
    recs = [records[k] for k in keys if k != SKIPPED["key"]]
    random.Random(index).shuffle(recs)  # order does not matter
    return recs, skipped


def write_all(root: Path, records: dict[str, Record], shards=range(3)) -> ShardWriter:
    w = ShardWriter(root, make_header(), KEYS)
    for i in shards:
        w.write_shard(i, *shard_args(i, records))
    return w


def assert_same_record(got: Record, want: Record) -> None:
    assert (got.key, got.height, got.width) == (want.key, want.height, want.width)
    assert set(got.labels) == set(want.labels)
    assert got.origin == {t: want.origin.get(t, "pseudo") for t in want.labels}
    for task, fields in want.labels.items():
        assert set(got.labels[task]) == set(fields)
        for f, a in fields.items():
            b = got.labels[task][f]
            assert b.dtype == a.dtype and b.shape == a.shape, (task, f)
            np.testing.assert_array_equal(b, a)  # float16 exactly


def test_round_trip(tmp_path: Path, records: dict[str, Record]) -> None:
    root = tmp_path / "store"
    w = write_all(root, records)
    manifest = json.loads(w.finalize().read_text())
    assert manifest["complete"] and manifest["format"] == "must-store/1"
    assert manifest["images"] == {
        "count": N_IMAGES,
        "sha256": keys_sha256(KEYS),
        "source": "runs/pool",
    }
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 3]
    assert [s["records"] for s in manifest["shards"]] == [4, 3, 3]
    assert manifest["skipped"] == [SKIPPED]
    assert manifest["tasks"]["depth"]["encoding"]["scale"] == "metric"
    assert manifest["settings"]["label_scale"] == 0.5

    store = PseudoLabelStore(root, max_open=2)
    assert store.keys == [k for k in KEYS if k != SKIPPED["key"]]
    assert len(store) == N_IMAGES - 1
    assert store.tasks == ["classification", "detection", "segmentation", "depth"]
    assert store.classes("segmentation") == SEG and store.classes("depth") is None
    assert KEYS[0] in store and SKIPPED["key"] not in store and "nope" not in store
    order = list(store.keys) * 2
    random.Random(1).shuffle(order)  # random access across shards, through a 2-handle LRU
    for key in order:
        assert_same_record(store.get(key), records[key])
    assert store.get(KEYS[1]).labels["detection"]["det_boxes"].shape == (0, 4)
    assert "depth" not in store.get(KEYS[2]).labels
    with pytest.raises(KeyError, match="unreadable image"):
        store.get(SKIPPED["key"])
    with pytest.raises(KeyError, match="not in this store"):
        store.get("nope")

    assert store.verify() == []
    s = store.summary()
    assert (s["records"], s["skipped"], s["shards"]) == (10, 1, {"written": 3, "total": 3})
    assert s["tasks"]["classification"]["real"] == 4  # images 0, 3, 6, 9
    assert s["tasks"]["depth"]["pseudo"] == 9  # image 2 has none, image 5 skipped

    # Any safetensors user can read a shard: names "{key}/{field}", records in the metadata.
    with safe_open(str(root / shard_name(0)), framework="numpy") as f:
        meta = json.loads(f.metadata()["records"])
        assert [r["key"] for r in meta] == KEYS[:4]
        assert meta[0]["tasks"]["classification"] == "real"
        np.testing.assert_array_equal(
            f.get_tensor(f"{KEYS[3]}/seg_map"), records[KEYS[3]].labels["segmentation"]["seg_map"]
        )


def test_resume_after_crash(tmp_path: Path, records: dict[str, Record]) -> None:
    root = tmp_path / "store"
    w = write_all(root, records, shards=[0, 2])
    # The crash: a temporary left while writing shard 1, a shard 1 without its sidecar.
    (root / f"{shard_name(1)}.{ended_pid()}-deadbeef.tmp").write_bytes(b"half a shard")
    (root / shard_name(1)).write_bytes((root / shard_name(0)).read_bytes())
    with pytest.raises(DataError, match="manifest.json: missing"):
        PseudoLabelStore(root)

    w2 = ShardWriter(root, make_header())  # reopened: keys come from keys.txt
    assert w2.done_shards() == {0, 2}
    assert w.finalize() and not json.loads((root / "manifest.json").read_text())["complete"]
    with pytest.raises(DataError, match="incomplete"):
        PseudoLabelStore(root)
    partial = PseudoLabelStore(root, allow_incomplete=True)
    assert len(partial) == 7 and KEYS[4] not in partial
    with pytest.raises(KeyError, match="not written"):
        partial.get(KEYS[4])
    assert any("shard-00001" in p for p in partial.verify())

    data = bytearray((root / shard_name(2)).read_bytes())  # corrupt one byte of a label
    data[-1] ^= 0xFF
    (root / shard_name(2)).write_bytes(bytes(data))
    assert w2.done_shards() == {0}

    for i in (1, 2):
        w2.write_shard(i, *shard_args(i, records))
    assert w2.done_shards() == {0, 1, 2}
    manifest = json.loads(w2.finalize().read_text())
    assert manifest["complete"]
    assert [s["records"] for s in manifest["shards"]] == [4, 3, 3]
    assert not list(root.glob("*.tmp"))
    store = PseudoLabelStore(root)
    assert store.verify() == []
    for key in store.keys:
        assert_same_record(store.get(key), records[key])

    # A store read while it is written (no manifest yet): sidecars stand in for it.
    (root / "manifest.json").unlink()
    assert len(PseudoLabelStore(root, allow_incomplete=True)) == 10


def ended_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_finalize_removes_only_temporaries_whose_writer_is_gone(
    tmp_path: Path, records: dict[str, Record]
) -> None:
    root = tmp_path / "store"
    w = write_all(root, records)
    host = shards._HOST
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Another writer of the same shard, still running: its temporary is its own.
        alive = root / f"{shard_name(1)}.{host}-{running.pid}-0123abcd.tmp"
        gone = root / f"{shard_name(2)}.{host}-{ended_pid()}-0123abcd.tmp"
        elsewhere = root / f"{shard_name(0)}.{'f' * 8}-1-0123abcd.tmp"  # another machine's
        for tmp in (alive, gone, elsewhere):
            tmp.write_bytes(b"half a shard")
        assert json.loads(w.finalize().read_text())["complete"]
        assert alive.exists() and elsewhere.exists() and not gone.exists()
        hour_ago = os.stat(elsewhere).st_mtime - 7200
        os.utime(elsewhere, (hour_ago, hour_ago))
        w.finalize()
        assert alive.exists() and not elsewhere.exists()
    finally:
        running.kill()
        running.wait()
    w.finalize()
    assert not list(root.glob("*.tmp"))


def test_two_writers_match_one(tmp_path: Path, records: dict[str, Record]) -> None:
    single = tmp_path / "single"
    write_all(single, records).finalize()
    shared = tmp_path / "shared"
    a = ShardWriter(shared, make_header(), KEYS)
    b = ShardWriter(shared, make_header(), KEYS)
    b.write_shard(2, *shard_args(2, records))
    a.write_shard(0, *shard_args(0, records))
    b.write_shard(1, *shard_args(1, records))
    a.finalize()
    assert (shared / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()
    one, two = PseudoLabelStore(single), PseudoLabelStore(shared)
    assert one.keys == two.keys
    for key in one.keys:
        assert_same_record(two.get(key), one.get(key))


def test_refusals(tmp_path: Path, records: dict[str, Record]) -> None:
    root = tmp_path / "store"
    write_all(root, records, shards=[0])
    with pytest.raises(ConfigError, match=r"settings\.det_threshold \(stored 0\.5, new 0\.7\)"):
        ShardWriter(root, make_header(threshold=0.7), KEYS)
    with pytest.raises(ConfigError, match=r"images\.(count|sha256)"):
        ShardWriter(root, make_header(), KEYS[:-1])
    w = ShardWriter(root, make_header(threshold=0.7), KEYS, overwrite=True)
    assert w.done_shards() == set() and not (root / shard_name(0)).exists()
    assert json.loads((root / "header.json").read_text())["settings"]["det_threshold"] == 0.7

    # Records that break the format, or do not cover the shard, are refused by name.
    recs, skipped = shard_args(0, records)
    with pytest.raises(DataError, match="neither recorded nor skipped"):
        w.write_shard(0, recs[1:], skipped)
    bad = Record(KEYS[0], 20, 20, {"segmentation": {"seg_map": np.full((4, 4), 99, np.uint8)}})
    with pytest.raises(DataError, match=r"pool/0000\.png.*seg_map"):
        w.write_shard(0, [bad, *(r for r in recs if r.key != KEYS[0])], skipped)
    with pytest.raises(DataError, match="not one of this shard"):
        w.write_shard(0, [*recs, records[KEYS[7]]], skipped)
    assert w.done_shards() == set() and not list(root.glob("*.tmp"))
    with pytest.raises(ConfigError, match="both segmentation"):
        h = make_header()
        h["tasks"]["seg2"] = {"kind": "segmentation", "classes": SEG}
        ShardWriter(tmp_path / "other", h, KEYS)


def test_reader_needs_neither_torch_nor_the_package(tmp_path: Path, records) -> None:
    root = tmp_path / "store"
    write_all(root, records).finalize()
    import must.store.shards as shards

    copied = tmp_path / "reader" / "store_reader.py"  # a user's copy of the one file
    copied.parent.mkdir()
    shutil.copy(shards.__file__, copied)
    code = f"""
import sys
sys.modules["torch"] = None  # importing torch now fails
import must.store.shards, must.store
assert "torch" not in sys.modules or sys.modules["torch"] is None
for name in [m for m in sys.modules if m == "must" or m.startswith("must.")]:
    del sys.modules[name]
sys.modules["must"] = None  # and so does the package: only the copied file is left
sys.path.insert(0, {str(copied.parent)!r})
import store_reader
store = store_reader.PseudoLabelStore({str(root)!r})
rec = store.get({KEYS[3]!r})
print(len(store), rec.origin["classification"], *rec.labels["segmentation"]["seg_map"].shape)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    seg_shape = records[KEYS[3]].labels["segmentation"]["seg_map"].shape
    assert out.stdout.split() == ["10", "real", *map(str, seg_shape)]


def test_finalizing_a_complete_store_again_writes_nothing(
    tmp_path: Path, records: dict[str, Record], monkeypatch
) -> None:
    # Re-running `must label` on a finished store must work where the store cannot be written
    # (a read-only mount): finalize() leaves an identical manifest alone.
    root = tmp_path / "store"
    w = write_all(root, records)
    manifest = w.finalize().read_bytes()

    def refuse(path, data):
        raise PermissionError(30, "Read-only file system", str(path))

    monkeypatch.setattr("must.store.shards._atomic_write", refuse)
    assert w.finalize().read_bytes() == manifest
