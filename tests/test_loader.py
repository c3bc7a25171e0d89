"""Data loading: what crosses the loaders' process boundary (uint8 images and class maps), the
model's uint8 input, how many workers ``auto`` gives, and workers started by forkserver (the
start method of a process that uses a GPU) giving the batches of in-process loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from must.checkpoint import save_model
from must.config import DataConfig, StudentDataConfig, ViewsConfig
from must.data.readers import MultiTaskDataset
from must.data.render import render_dataset
from must.data.styles import load_style
from must.data.transforms import build_transforms
from must.models.backbone import BackboneConfig
from must.models.model import MultiTaskModel
from must.stages.label import label_images
from must.stages.pretrain import TwoViews, simclr_views
from must.store import StoreDataset
from must.store.dataset import store_tasks
from must.tasks import build_task
from must.tasks.base import Batch
from must.training import data as loading
from must.training.data import make_dataset, make_loader, resolve_workers, worker_context

TINY = BackboneConfig(depth=10, widths=(8, 16, 32, 64), stem_width=8, fpn_channels=16)
PX = 32


@pytest.fixture(scope="module")
def novel(tmp_path_factory) -> Path:
    """Eight images with every task's labels (the downstream style labels all five)."""
    out = tmp_path_factory.mktemp("loader") / "novel"
    render_dataset("novel", out, 8, PX, splits=(0.5, 0.5, 0), progress=False)
    return out


def eval_set(root: Path) -> MultiTaskDataset:
    """The val split with the evaluation transform: the same samples on every read."""
    return make_dataset(root, "val", DataConfig(dataset=str(root), image_size=PX), train=False)


def tasks_of(dataset: MultiTaskDataset) -> dict:
    return {n: build_task(n, dataset.classes.get(n)) for n in dataset.tasks}


def assert_same(a, b, where: str = "batch") -> None:
    """Equal values and dtypes, through batches, dicts, lists and tuples."""
    if isinstance(a, Batch):
        assert isinstance(b, Batch) and a.keys == b.keys, where
        assert_same(a.images, b.images, f"{where}.images")
        assert_same(a.targets, b.targets, f"{where}.targets")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, (where, a.dtype, b)
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_images_and_class_maps_cross_as_uint8(novel):
    dataset = eval_set(novel)
    batch = next(iter(make_loader(dataset, tasks_of(dataset), 4, 0, False)))
    samples = [dataset[i] for i in range(4)]
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, PX, PX)
    assert torch.equal(batch.images, torch.stack([s["image"] for s in samples]))
    seg = batch.targets["segmentation"]["labels"]
    assert seg.dtype == torch.uint8
    assert torch.equal(seg.long(), torch.stack([s["segmentation"] for s in samples]))
    assert batch.targets["depth"]["depth"].dtype == torch.float32
    assert batch.targets["normals"]["normals"].dtype == torch.float32


def test_a_model_gives_the_same_outputs_for_uint8_images_as_for_floats_in_0_1(novel):
    dataset = eval_set(novel)
    tasks = tasks_of(dataset)
    batch = next(iter(make_loader(dataset, tasks, 4, 0, False)))
    floats = batch.images.float() / 255
    torch.manual_seed(0)
    model = MultiTaskModel(TINY, tasks).eval()
    for dtype in (None, torch.bfloat16):  # also under CPU autocast, as bf16-mixed runs it
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):
            got, _ = model(batch.images)
            want, _ = model(floats)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    model.train()  # losses too (the RoI sampler draws at random: same seed for both)
    torch.manual_seed(1)
    _, got = model(batch.images, batch.targets)
    torch.manual_seed(1)
    _, want = model(floats, batch.targets)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_auto_workers_are_half_the_usable_cpus_at_most_8_and_none_on_two(monkeypatch):
    assert DataConfig(dataset="rooms").num_workers == "auto"
    assert StudentDataConfig().num_workers == "auto"
    for cpus, workers in ((1, 0), (2, 0), (3, 1), (4, 2), (6, 3), (16, 8), (64, 8)):
        monkeypatch.setattr(loading, "usable_cpus", lambda cpus=cpus: cpus)
        assert resolve_workers("auto") == workers, cpus
    assert resolve_workers(0) == 0 and resolve_workers(5) == 5


def test_workers_of_a_gpu_process_start_by_forkserver_and_cpu_ones_by_default(monkeypatch):
    def method(accelerator, workers=2):
        context = worker_context(accelerator, workers)
        return None if context is None else context.get_start_method()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert method("cpu") is None and method("auto") is None
    assert method(torch.device("cpu")) is None
    for gpu in ("gpu", "cuda", torch.device("cuda", 0)):
        assert method(gpu) == "forkserver"
        assert method(gpu, workers=0) is None  # no worker process, no start method
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert method("auto") == "forkserver"


def make_store(root: Path, dataset: Path) -> Path:
    """A store of ``dataset``'s train images labelled by a random tiny teacher."""
    style = load_style("mixed")
    torch.manual_seed(0)
    model = MultiTaskModel(
        TINY,
        {
            "classification": build_task("classification", style.category_names),
            "segmentation": build_task("segmentation", style.segmentation_classes),
            "depth": build_task("depth", None),
        },
    )
    save_model(model, root / "teacher", {"image_size": PX})
    store = root / "store"
    label_images(
        [str(root / "teacher")], str(dataset), store, shard_size=2, batch_size=4, workers=0,
        progress=False,
    )  # fmt: skip
    return store


def batches(dataset, tasks, workers: int) -> list:
    # accelerator "gpu" only chooses how workers start (forkserver): nothing runs on a GPU.
    loader = make_loader(dataset, tasks, 2, workers, False, accelerator="gpu")
    if workers:
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
    out = list(loader)
    del loader  # its persistent workers end here
    return out


@pytest.mark.slow
def test_forkserver_workers_give_the_batches_of_the_main_process(novel, tmp_path):
    """Datasets, transforms and collate functions pickle, and what comes back is what
    in-process loading gives: the scene-world reader, SimCLR's two views and a store."""
    dataset = eval_set(novel)
    tasks = tasks_of(dataset)
    assert_same(batches(dataset, tasks, 2), batches(dataset, tasks, 0))

    images = MultiTaskDataset(novel, split="train", tasks=[])
    fixed = TwoViews(images, v2.Resize(16, antialias=True))
    assert_same(batches(fixed, None, 2), batches(fixed, None, 0))
    drawn = batches(TwoViews(images, simclr_views(ViewsConfig(), 16)), None, 2)
    assert len(drawn) == 2
    for a, b in drawn:
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (2, 3, 16, 16)

    store = StoreDataset(make_store(tmp_path, novel), transform=build_transforms(False, PX))
    store.store.check_shards()  # as training does: checked shards stay checked in workers
    store[0]  # a shard left open in this process must not be sent to the workers
    tasks = store_tasks(store.store)
    assert_same(batches(store, tasks, 2), batches(store, tasks, 0))


def test_in_process_loading_prepares_samples_with_one_thread_and_restores_the_count(novel):
    seen = []

    class Probe(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return torch.tensor(index)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = make_loader(Probe(), None, 2, 0, False)
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]
        assert seen == [1, 1, 1, 1]
        assert torch.get_num_threads() == 2
        # The wrapped dataset's attributes stay reachable through the loader's dataset.
        dataset = make_dataset(novel, "train", DataConfig(dataset=str(novel), image_size=PX), False)
        assert make_loader(dataset, None, 2, 0, False).dataset.split == "train"
    finally:
        torch.set_num_threads(before)
