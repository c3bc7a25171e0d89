"""The ``must`` command: one verb per stage of the method."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from must.errors import MustError

if TYPE_CHECKING:  # the CLI imports its verbs' modules lazily, so that --help is instant
    from must.summary import RunInfo


def _write_json(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _cmd_data_styles(args: argparse.Namespace) -> int:
    from must.data.styles import builtin_style_names, load_style

    names = builtin_style_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {load_style(name).description}")
    return 0


def _cmd_data_render(args: argparse.Namespace) -> int:
    from must.data.render import render_dataset

    tasks = None
    if args.tasks is not None:
        from must.data.spec import TASKS

        tasks = list(TASKS) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    manifest = render_dataset(
        args.style,
        args.out,
        args.num,
        args.size,
        seed=args.seed,
        splits=args.splits,
        tasks=tasks,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"wrote {args.num} images of style {args.style!r} to {args.out} (manifest: {manifest})")
    return 0


def _cmd_data_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from must.data.show import show_dataset

    out = args.out or Path(args.dataset) / f"preview-{args.split}.png"
    path = show_dataset(args.dataset, out, split=args.split, num=args.num)
    print(f"wrote {path}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from must.data.readers import MultiTaskDataset

    dataset = MultiTaskDataset(args.dataset, split=args.split, on_error="skip", show_progress=True)
    print(dataset.report())
    return 1 if dataset.skipped else 0


def _cmd_data_import(args: argparse.Namespace) -> int:
    from must.data.importers import FASHION_MNIST_DIR, import_fashion_mnist

    out = import_fashion_mnist(
        args.out,
        source=args.source or FASHION_MNIST_DIR,
        num_per_class=args.num_per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        overwrite=args.overwrite,
    )
    print(f"{args.dataset} written to {out} (check it with: must data check {out})")
    return 0


def _cmd_teach(args: argparse.Namespace) -> int:
    from must.config import TeachConfig, load_config
    from must.stages.teach import teach

    cfg = load_config(TeachConfig, args.config, args.overrides)
    summary = teach(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if summary is None:  # another process of a multi-process run: rank 0 reports
        return 0
    task = cfg.task
    from must.stages.evaluate import format_table

    info = _info(summary, args.out)
    print(f"teacher for {task} written to {args.out} ({info.steps} steps)")
    print("validation (split 'val'):")
    print(format_table(info.val))
    _print_test(info, "split 'test'")
    return 0


def _info(summary: dict, out: str) -> RunInfo:
    from must.summary import run_info

    return run_info(summary, out)


def _print_test(info: RunInfo, where: str) -> None:
    """The test table, or what was measured instead where a dataset has no 'test' split."""
    from must.stages.evaluate import format_table

    if info.test:
        print(f"test ({where}):")
        print(format_table(info.test))
    untested = info.untested or ([] if info.test else ["all tasks"])
    if untested:
        print(f"no test metrics for {', '.join(untested)}: no 'test' split (validation above)")


def _cmd_eval(args: argparse.Namespace) -> int:
    from must.data.source import source_from_arguments
    from must.stages.evaluate import NothingToMeasure, evaluate, format_table

    try:
        results = evaluate(
            args.checkpoint,
            source_from_arguments(args.data, args),
            split=args.split,
            batch_size=args.batch_size,
            image_size=args.image_size,
            resize=args.resize,
            predictions=args.predictions,
            progress=not args.quiet,
        )
    except NothingToMeasure as err:
        if err.results:  # what was measured is shown; the run still fails
            print(format_table(err.results))
        raise
    print(format_table(results))
    if args.json:
        _write_json(args.json, results)
    return 0


def _cmd_label_run(args: argparse.Namespace) -> int:
    from must.data.source import source_from_arguments
    from must.stages.label import LabelSettings, label_images, label_setting_defaults

    # The tasks' settings not given on the command line (None) take their task's default.
    given = {k: getattr(args, k, None) for k in label_setting_defaults()}
    settings = LabelSettings(
        label_scale=args.label_scale, **{k: v for k, v in given.items() if v is not None}
    )
    result = label_images(
        args.teacher,
        source_from_arguments(args.images, args),
        args.out,
        settings=settings,
        split=args.split,
        keep_real=args.keep_real,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        workers=args.workers,
        rank=args.rank,
        world_size=args.world_size,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.quiet,
    )
    print(result.summary())
    return 0


def _cmd_label_show(args: argparse.Namespace) -> int:
    from must.stages.label_inspect import show_store

    path = show_store(args.store, args.out, num=args.num, image_root=args.image_root)
    print(f"wrote {path}")
    return 0


def _cmd_label_stats(args: argparse.Namespace) -> int:
    from must.stages.label_inspect import format_stats, store_stats

    stats = store_stats(args.store)
    print(format_stats(stats))
    if args.json:
        _write_json(args.json, stats)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from must.config import StudentConfig, load_config
    from must.stages.evaluate import format_table
    from must.stages.train import train_student

    overrides = list(args.overrides)
    if args.store:
        overrides.append(f"data.stores={json.dumps(args.store)}")
    if args.init:
        overrides.append(f"init={json.dumps(args.init)}")
    cfg = load_config(StudentConfig, args.config, overrides)
    summary = train_student(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if summary is None:  # another process of a multi-process run: rank 0 reports
        return 0
    info = _info(summary, args.out)
    print(f"student with tasks {', '.join(summary['tasks'])} written to {args.out}")
    print(f"loss weighting: {info.loss_weighting}")
    if info.untested or not info.test:
        print("validation (each teacher's own 'val' split):")
        print(format_table(info.val))
    _print_test(info, "each teacher's own 'test' split")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from must.stages.train import export_backbone

    path = export_backbone(args.checkpoint, args.out, with_fpn=args.with_fpn)
    print(f"wrote {path}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from must.config import SimCLRConfig, load_config
    from must.stages.pretrain import pretrain_simclr

    cfg = load_config(SimCLRConfig, args.config, args.overrides)
    summary = pretrain_simclr(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if summary is None:  # another process of a multi-process run: rank 0 reports
        return 0
    info = _info(summary, args.out)
    print(
        f"SimCLR backbone written to {args.out} ({info.steps} steps, "
        f"final loss {info.final_loss:.3f})"
    )
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    from must.config import TeachConfig, load_config
    from must.stages.evaluate import format_table
    from must.stages.teach import teach

    merge: dict = {"init": None if args.backbone == "random" else args.backbone}
    if args.probe:
        merge["freeze_backbone"] = True
    cfg = load_config(TeachConfig, args.config, args.overrides, merge)
    summary = teach(
        cfg, args.out, overwrite=args.overwrite, progress=not args.quiet, stage="transfer"
    )
    if summary is None:  # another process of a multi-process run: rank 0 reports
        return 0
    info = _info(summary, args.out)
    mode = "probe (frozen backbone)" if cfg.freeze_backbone else "fine-tuning"
    print(f"{cfg.task} {mode} from {args.backbone} written to {args.out}")
    if not info.test:
        print("validation (split 'val'):")
        print(format_table(info.val))
    _print_test(info, "split 'test', checkpoint selected on validation")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from must.stages.experiment import load_experiment, run_experiment

    overrides, only = args.overrides, args.only
    if only is not None:  # argparse gives --only the KEY=VALUE overrides that follow it
        overrides = [*overrides, *(s for s in only if "=" in s)]
        only = [s for s in only if "=" not in s]
    cfg = load_experiment(args.experiment, overrides)
    run_experiment(cfg, args.out, progress=not args.quiet, only=only)
    report = Path(args.out) / "report.md"
    print(f"run folder {args.out} is complete")
    if report.is_file() and (only is None or "report" in only):
        # The headline and the transfer table: the run's results, without opening the report.
        text = report.read_text()
        for section in ("## Headline", "## Transfer"):
            if section in text:
                print(text.split(section, 1)[1].split("\n## ", 1)[0].split("\n", 1)[1].strip())
        print(f"\nfull report: {report} (and report.html)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from must.stages.report import write_report

    path = write_report(args.runs, args.out or args.runs[0], resamples=args.resamples)
    print(f"wrote {path} (and report.html beside it)")
    return 0


def _cmd_convert_model(args: argparse.Namespace) -> int:
    from must.checkpoint import convert_model

    path = convert_model(args.old, args.out)
    print(f"wrote {path} (and summary.json beside it)")
    return 0


def _add_convert_parser(verbs: argparse._SubParsersAction) -> None:
    convert = verbs.add_parser(
        "convert-model",
        help="convert a trusted model.pt of an older must into model.safetensors",
        description="Older versions of must wrote model.pt, a pickle; it is refused because "
        "loading a pickle can run code. This reads a trusted one with weights_only=True (tensors "
        "and plain values only) and writes OUT/model.safetensors and OUT/summary.json.",
    )
    convert.add_argument("old", help="the old checkpoint directory or its model.pt")
    convert.add_argument("--out", required=True, help="directory to write (may be the same)")
    convert.set_defaults(func=_cmd_convert_model, outputs={"out": "dir"})


LABEL_ACTIONS = ("run", "show", "stats")


def _add_label_parser(verbs: argparse._SubParsersAction) -> None:
    from must.data.source import add_source_arguments

    label = verbs.add_parser(
        "label",
        help="pseudo-label images with teachers into a store; show or summarise a store",
        description="must label --teacher CKPT [--teacher CKPT ...] --images SOURCE --out STORE "
        "writes a pseudo-label store ('run' is implied); 'must label show STORE' draws it; "
        "'must label stats STORE' summarises it. See docs/labeling.md.",
    )
    actions = label.add_subparsers(dest="label_action", required=True, metavar="ACTION")

    run = actions.add_parser(
        "run",
        help="label images with teachers into a store (the default action)",
        description="Run every teacher over the images and write a pseudo-label store. "
        "Re-running the same command resumes; several processes (--rank/--world-size, or "
        "torchrun's RANK/WORLD_SIZE) split the shards between them.",
    )
    run.add_argument(
        "--teacher",
        action="append",
        required=True,
        metavar="CKPT",
        help="teacher checkpoint directory or model.safetensors (repeat for each teacher)",
    )
    run.add_argument(
        "--images",
        required=True,
        metavar="SOURCE",
        help="a folder of images (ImageFolder included), a dataset folder (manifest.json or "
        "dataset.yaml), or a scene-world style name (rendered into --cache)",
    )
    run.add_argument("--out", required=True, metavar="STORE", help="store folder to write")
    run.add_argument("--split", default="train", help="split of a dataset folder (default train)")
    # The tasks' labelling settings: no default here (None), the task classes hold them.
    run.add_argument("--det-threshold", type=float, help="keep boxes with score >= it")
    run.add_argument(
        "--seg-threshold",
        type=float,
        help="ignore (255) pixels whose top class probability is below it",
    )
    run.add_argument("--temperature", type=float, help="classification: softmax(logits / T)")
    run.add_argument(
        "--label-scale",
        type=float,
        default=1.0,
        help="pixel labels at this fraction of the image's own size (default 1)",
    )
    run.add_argument(
        "--keep-real",
        action="store_true",
        help="keep the real labels a dataset folder has (origin 'real') instead of pseudo labels",
    )
    run.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    run.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    run.add_argument("--workers", type=int, default=2, help="image decoding processes (default 2)")
    run.add_argument("--rank", type=int, default=None, help="this process (default $RANK or 0)")
    run.add_argument(
        "--world-size", type=int, default=None, help="processes (default $WORLD_SIZE or 1)"
    )
    run.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK if any, else cpu")
    run.add_argument(
        "--overwrite", action="store_true", help="replace a store made with another config"
    )
    add_source_arguments(run)
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_label_run, outputs={"out": "dir"})

    show = actions.add_parser("show", help="draw images of a store with their labels (PNG)")
    show.add_argument("store", help="store folder")
    show.add_argument("--num", type=int, default=8, help="images to draw (default 8)")
    show.add_argument("--out", default=None, help="PNG path (default STORE/preview.png)")
    show.add_argument("--image-root", default=None, help="where the images are, if they moved")
    show.set_defaults(func=_cmd_label_show, outputs={"out": "file"})

    stats = actions.add_parser("stats", help="print per-task statistics of a store")
    stats.add_argument("store", help="store folder")
    stats.add_argument("--json", default=None, help="also write the statistics to this file")
    stats.set_defaults(func=_cmd_label_stats, outputs={"json": "file"})


def _training_verb(
    verbs: argparse._SubParsersAction, name: str, func, out_help: str, **texts: str
) -> argparse.ArgumentParser:
    """A verb that trains from a config: CONFIG, KEY=VALUE overrides, --out, --overwrite,
    --quiet (teach, train, pretrain, transfer)."""
    verb = verbs.add_parser(name, **texts)
    verb.add_argument("config", help="config YAML file or preset name")
    verb.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    verb.add_argument("--out", required=True, help=out_help)
    verb.add_argument("--overwrite", action="store_true", help="replace a run of another config")
    verb.add_argument("--quiet", action="store_true", help="no progress bars")
    verb.set_defaults(func=func, outputs={"out": "dir"})
    return verb


def build_parser() -> argparse.ArgumentParser:
    from must.data.source import DataSource, add_source_arguments, parse_splits

    parser = argparse.ArgumentParser(
        prog="must", description="Multi-task self-training (MuST) for computer vision."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    data = verbs.add_parser("data", help="render, inspect and check datasets")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="ACTION")

    styles = data_verbs.add_parser("styles", help="list the scene world's styles")
    styles.set_defaults(func=_cmd_data_styles)

    render = data_verbs.add_parser(
        "render", help="render a style of the scene world to disk in standard formats"
    )
    render.add_argument("--style", required=True, help="built-in style name or a style YAML file")
    render.add_argument("--num", type=int, required=True, help="number of images (all splits)")
    render.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    render.add_argument("--out", required=True, help="output folder")
    render.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    render.add_argument(
        "--splits",
        type=parse_splits,
        default=[0.8, 0.1, 0.1],
        help="train,val,test fractions (default 0.8,0.1,0.1)",
    )
    render.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks to write labels for, or 'all' (default: the style's tasks)",
    )
    render.add_argument(
        "--workers", type=int, default=0, help="render processes (default 0: in this process)"
    )
    render.add_argument(
        "--overwrite", action="store_true", help="replace a dataset rendered with other settings"
    )
    render.add_argument("--quiet", action="store_true", help="no progress bar")
    render.set_defaults(func=_cmd_data_render, outputs={"out": "dir"})

    show = data_verbs.add_parser("show", help="draw samples with their labels into a PNG grid")
    show.add_argument("dataset", help="dataset folder (manifest.json or dataset.yaml)")
    show.add_argument("--split", default="train")
    show.add_argument("--num", type=int, default=8, help="samples to draw (default 8)")
    show.add_argument("--out", default=None, help="PNG path (default DATASET/preview-SPLIT.png)")
    show.set_defaults(func=_cmd_data_show, outputs={"out": "file"})

    check = data_verbs.add_parser(
        "check", help="decode every file of a split and report bad samples (exit 1 if any)"
    )
    check.add_argument("dataset", help="dataset folder (manifest.json or dataset.yaml)")
    check.add_argument("--split", default="train")
    check.set_defaults(func=_cmd_data_check)

    imp = data_verbs.add_parser(
        "import",
        help="write a public dataset's files as a dataset folder (ImageFolder + dataset.yaml)",
        description="fashion-mnist: Fashion-MNIST's IDX files, as Debian's "
        "dataset-fashion-mnist package installs them, written as images/{train,val,test}/"
        "<class>/0001.png and a dataset.yaml.",
    )
    imp.add_argument("dataset", choices=["fashion-mnist"], help="the dataset to import")
    imp.add_argument("--out", required=True, help="output folder")
    imp.add_argument(
        "--source",
        default=None,
        help="folder of the IDX files (default: where the Debian package puts them, "
        "/usr/share/datasets/fashion-mnist)",
    )
    imp.add_argument(
        "--num-per-class", type=int, default=None, help="training images per class (default all)"
    )
    imp.add_argument(
        "--val-per-class",
        type=int,
        default=500,
        help="validation images per class, held out of the training file (default 500)",
    )
    imp.add_argument(
        "--test-per-class", type=int, default=None, help="test images per class (default all)"
    )
    imp.add_argument("--overwrite", action="store_true", help="replace a dataset already there")
    imp.set_defaults(func=_cmd_data_import, outputs={"out": "dir"})

    _training_verb(
        verbs,
        "teach",
        _cmd_teach,
        "checkpoint directory to write",
        help="train a specialized teacher for one task",
        description="Train a specialized teacher. CONFIG is a YAML file or a preset name from "
        "configs/ (e.g. teach_detection_cpu); KEY=VALUE arguments override any config key, "
        "e.g. train.lr=0.05 model.backbone.depth=50. Re-running resumes from the last checkpoint.",
    )

    ev = verbs.add_parser("eval", help="evaluate a checkpoint on a dataset and print a table")
    ev.add_argument("checkpoint", help="checkpoint directory (or its model.safetensors)")
    ev.add_argument("--data", required=True, help="dataset folder or scene-world style name")
    ev.add_argument(
        "--split",
        default=None,
        help="split to evaluate (default: test, or val where the dataset has no test split)",
    )
    ev.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    ev.add_argument(
        "--predictions",
        default=None,
        help="also write the detections as a COCO results JSON (original image ids, "
        "category ids and pixels), for pycocotools' COCOeval",
    )
    ev.add_argument(
        "--resize",
        choices=("auto", "square", "keep_aspect"),
        default="auto",
        help="how images are resized (default auto: keep_aspect for detection on a dataset "
        "folder, square otherwise)",
    )
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--image-size", type=int, default=None, help="default: the training size")
    add_source_arguments(ev, DataSource(dataset="-", num=1000))
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_eval, outputs={"json": "file", "predictions": "file"})

    _add_label_parser(verbs)

    train = _training_verb(
        verbs,
        "train",
        _cmd_train,
        "checkpoint directory to write",
        help="train the multi-task student on pseudo-labelled stores",
        description="Train the MuST student. CONFIG is a YAML file or a preset name "
        "(train_student_cpu); KEY=VALUE arguments override any key. Re-running resumes.",
    )
    train.add_argument(
        "--store", action="append", default=[], help="a store from must label (repeatable)"
    )
    train.add_argument("--init", default=None, help="starting checkpoint or backbone state dict")

    _training_verb(
        verbs,
        "pretrain",
        _cmd_pretrain,
        "checkpoint directory to write",
        help="SimCLR self-supervised pre-training of a backbone on unlabelled images",
        description="Pre-train a backbone with SimCLR (the self-supervised baseline). CONFIG is "
        "a YAML file or a preset (simclr_cpu); KEY=VALUE arguments override any key.",
    )

    transfer = _training_verb(
        verbs,
        "transfer",
        _cmd_transfer,
        "directory to write",
        help="fine-tune (or probe) a backbone on a downstream task with a fresh head",
        description="Fine-tune a pre-trained backbone on a downstream task with a fresh head "
        "and report validation-selected test metrics. CONFIG is a YAML file or a preset "
        "(transfer_cpu); choose the task with task=NAME.",
    )
    transfer.add_argument(
        "--backbone",
        required=True,
        help="a must checkpoint (directory or model.safetensors), a state dict file of the "
        "backbone's body (torchvision/timm ResNet, or the timm model named by "
        "model.backbone.name), or random",
    )
    transfer.add_argument("--probe", action="store_true", help="freeze the backbone")

    run = verbs.add_parser(
        "run",
        help="run the whole method (teachers, labels, student, baselines, transfer, report)",
        description="Run an experiment's stages in one run folder, skipping finished work. "
        "EXPERIMENT is a YAML file or a preset: quickstart, mini, gpu. KEY=VALUE arguments "
        "override any key (e.g. seed=1).",
    )
    run.add_argument("experiment", help="experiment YAML file or preset name")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="experiment overrides")
    run.add_argument("--out", required=True, help="run folder")
    run.add_argument("--only", nargs="+", default=None, metavar="STAGE", help="run these stages")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run, outputs={"out": "dir"})

    report = verbs.add_parser(
        "report",
        help="write the Markdown/HTML report of one or more run folders (seeds are merged)",
    )
    report.add_argument("runs", nargs="+", help="run folders of must run (one per seed)")
    report.add_argument("--out", default=None, help="report folder (default: the first run)")
    report.add_argument(
        "--resamples",
        type=int,
        default=2000,
        help="bootstrap resamples of the test images per column (default 2000)",
    )
    report.set_defaults(func=_cmd_report, outputs={"out": "dir"})

    export = verbs.add_parser(
        "export", help="write a checkpoint's backbone as a plain safetensors state dict"
    )
    export.add_argument("checkpoint", help="checkpoint directory (or its model.safetensors)")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.add_argument("--with-fpn", action="store_true", help="include the FPN (prefix fpn.)")
    export.set_defaults(func=_cmd_export, outputs={"out": "file"})
    _add_convert_parser(verbs)
    return parser


def _label_default_action(argv: list[str]) -> list[str]:
    """``must label --teacher ...`` means ``must label run --teacher ...``."""
    if argv[:1] == ["label"] and len(argv) > 1 and argv[1] not in (*LABEL_ACTIONS, "-h", "--help"):
        return ["label", "run", *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = _label_default_action(list(sys.argv[1:] if argv is None else argv))
    # KEY=VALUE overrides may come after options (argparse would only take them before).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any("=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        check_outputs(args)
        return args.func(args)
    except MustError as err:
        print(f"must: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A write or read the checks above could not foresee (a folder made read-only
        # meanwhile, a full disk): one line naming the file, not a traceback.
        where = f"{err.filename}: " if err.filename else ""
        print(f"must: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("must: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse unusable output paths before any work starts (see ``must.paths``)."""
    from must.paths import output_dir, output_file

    for attr, kind in getattr(args, "outputs", {}).items():
        value = getattr(args, attr, None)
        if value is not None:
            (output_dir if kind == "dir" else output_file)(value)


if __name__ == "__main__":
    sys.exit(main())
