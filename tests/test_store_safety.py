"""A store from elsewhere, or from two runs at once: every reader refuses a damaged shard (naming
it and the command that repairs it), re-running that command repairs exactly the damaged shard,
and two `must label` runs on one store at the same time both finish cleanly."""

from __future__ import annotations

import filecmp
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import must.store.shards as shards
from must.cli import main
from must.data.render import render_dataset
from must.errors import DataError
from must.store import PseudoLabelStore, StoreDataset
from test_label import make_teacher
from tiny import TINY_MODEL

POOL_SIZE, SHARD = 8, 4  # two shards
LABEL = ["--shard-size", str(SHARD), "--batch-size", "4", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A teacher, an image pool and the store `must label` makes of them."""
    root = tmp_path_factory.mktemp("safety")
    pool = root / "pool"
    render_dataset("mixed", pool, POOL_SIZE, 32, splits=(1, 0, 0), progress=False)
    teacher = make_teacher(root / "teacher", ["classification", "segmentation", "depth"])
    store = root / "store"
    args = ["label", "--teacher", str(teacher), "--images", str(pool), "--out", str(store)]
    assert main([*args, *LABEL]) == 0
    return teacher, pool, store


def flip_a_bit_of_tensor_data(shard: Path) -> None:
    """One bit in the middle of the tensor bytes: the file keeps its size and still parses."""
    data = bytearray(shard.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    start = 8 + header
    data[(start + len(data)) // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def test_a_damaged_shard_is_refused_by_every_reader_and_relabelling_repairs_it(
    world, tmp_path, capsys, monkeypatch
):
    _teacher, _pool, made = world
    store = tmp_path / "store"
    shutil.copytree(made, store)
    bad = store / "shard-00001.safetensors"
    flip_a_bit_of_tensor_data(bad)
    assert any("shard-00001" in p for p in PseudoLabelStore(store).verify())
    capsys.readouterr()

    def refused(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{bad}: sha256 differs" in err and "must label" in err, err
        return err

    refused(["label", "stats", str(store)])
    refused(["label", "show", str(store), "--num", str(POOL_SIZE), "--out", str(tmp_path / "p")])
    refused(["train", "train_student_cpu", *TINY_MODEL, "--store", str(store),
             "--out", str(tmp_path / "student"), "--quiet"])  # fmt: skip
    dataset = StoreDataset(store)
    dataset[0]  # shard 0 is intact and still served
    with pytest.raises(DataError, match="shard-00001.safetensors: sha256 differs"):
        dataset[SHARD]
    reader = PseudoLabelStore(store)
    with pytest.raises(DataError, match="shard-00001.safetensors: sha256 differs"):
        reader.get(reader.keys[-1])

    # The message holds the command that made the store; re-running it rewrites only shard 1.
    message = refused(["label", "stats", str(store)])
    command = shlex.split(message.split("re-running the command that made it: ")[1])
    assert command[:2] == ["must", "label"]
    assert main([*command[1:], "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 shard(s)" in printed and "1 of its shard(s) were already done" in printed
    assert same_files(store, made)
    assert PseudoLabelStore(store).verify() == []

    # Each shard is hashed once per reader, however many records are read from it.
    hashed = []
    monkeypatch.setattr(shards, "file_sha256", lambda p: hashed.append(p) or _sha(p))
    reader = PseudoLabelStore(store, max_open=1)
    for key in reader.keys * 3:
        reader.get(key)
    assert sorted(Path(p).name for p in hashed) == ["shard-00000.safetensors", bad.name]


_sha = shards.file_sha256


# Slows the writing of every shard in a child process, so that its temporary stays on disk
# for a while: long enough for the other run to finish and finalize meanwhile.
SLOW_CHILD = """
import sys, time
import must.store.shards as shards
save = shards.save_file
def slow(*a, **k):
    save(*a, **k)
    time.sleep(1.0)
shards.save_file = slow
from must.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_together(*argvs: list[str]) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SLOW_CHILD, *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_the_same_command_started_twice_on_one_store_finishes_cleanly(world, tmp_path):
    teacher, pool, made = world
    store = tmp_path / "store"
    args = ["label", "--teacher", str(teacher), "--images", str(pool), "--out", str(store)]
    for run in start_together([*args, *LABEL], [*args, *LABEL]):
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert PseudoLabelStore(store).verify() == []
    assert json.loads((store / "manifest.json").read_text())["complete"]
    assert not list(store.glob("*.tmp"))
    assert same_files(store, made)


@pytest.mark.slow
def test_two_ranks_at_the_same_time_make_the_complete_store(world, tmp_path):
    teacher, pool, made = world
    store = tmp_path / "store"
    args = ["label", "--teacher", str(teacher), "--images", str(pool), "--out", str(store)]
    runs = start_together(
        [*args, *LABEL, "--rank", "0", "--world-size", "2"],
        [*args, *LABEL, "--rank", "1", "--world-size", "2"],
    )
    for run in runs:
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert sum("wrote 1 shard(s)" in run.stdout for run in runs) == 2
    assert PseudoLabelStore(store).verify() == []
    assert same_files(store, made)
