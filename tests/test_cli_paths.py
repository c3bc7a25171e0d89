"""Output paths are checked before any work starts, and overrides take values literally."""

from __future__ import annotations

import os
import tempfile

import pytest

from must.cli import main
from must.config import TeachConfig, load_config, parse_overrides
from must.errors import ConfigError

# Every writing verb, with its output argument; inputs need not exist: the output check comes
# first, so a bad --out is reported without reading (or rendering, or training) anything.
WRITERS = {
    "teach": ["teach", "teach_segmentation_cpu", "--out", "{}"],
    "train": ["train", "train_student_cpu", "--out", "{}"],
    "pretrain": ["pretrain", "simclr_cpu", "--out", "{}"],
    "transfer": ["transfer", "transfer_cpu", "--backbone", "random", "--out", "{}"],
    "label": ["label", "--teacher", "t", "--images", "i", "--out", "{}"],
    "render": ["data", "render", "--style", "rooms", "--num", "4", "--out", "{}"],
    "run": ["run", "quickstart", "--out", "{}"],
    "report": ["report", "r", "--out", "{}"],
}
FILE_WRITERS = {
    "export": ["export", "ckpt", "--out", "{}"],
    "eval": ["eval", "ckpt", "--data", "d", "--json", "{}"],
    "eval --predictions": ["eval", "ckpt", "--data", "d", "--predictions", "{}"],
    "label show": ["label", "show", "store", "--out", "{}"],
    "label stats": ["label", "stats", "store", "--json", "{}"],
    "data show": ["data", "show", "dataset", "--out", "{}"],
}


def _run(argv: list[str], path, capsys) -> tuple[int, str]:
    code = main([a.format(path) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("verb", WRITERS)
def test_output_folder_that_is_a_file_is_one_line_before_any_work(verb, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    code, err = _run(WRITERS[verb], file, capsys)
    assert code == 2
    assert err == f"must: error: {file}: exists and is not a directory\n"
    code, err = _run(WRITERS[verb], file / "sub", capsys)
    assert code == 2 and "exists and is not a directory" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing written


@pytest.mark.parametrize("verb", FILE_WRITERS)
def test_output_file_that_is_a_folder_is_one_line_before_any_work(verb, tmp_path, capsys):
    code, err = _run(FILE_WRITERS[verb], tmp_path, capsys)
    assert code == 2
    assert err == f"must: error: {tmp_path}: is a directory; give a file name\n"
    file = tmp_path / "f"
    file.write_text("x")
    code, err = _run(FILE_WRITERS[verb], file / "out.json", capsys)
    assert code == 2 and "exists and is not a directory" in err


def test_unwritable_parent_is_refused(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.geteuid() == 0:
            # Permissions do not bind root: stand in for a read-only mount with the error
            # the kernel gives there.
            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        code, err = _run(WRITERS["teach"], parent / "teacher", capsys)
        assert code == 2
        assert err.startswith(f"must: error: {parent / 'teacher'}: not writable")
        assert not (parent / "teacher").exists()
    finally:
        parent.chmod(0o755)


def test_output_file_in_an_unwritable_folder_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch
):
    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    target = tmp_path / "metrics.json"
    code, err = _run(FILE_WRITERS["eval"], target, capsys)
    assert code == 2
    assert err == f"must: error: {target}: not writable ({tmp_path}: read-only file system)\n"


def test_os_errors_during_work_are_one_line(tmp_path, capsys, monkeypatch):
    import must.cli

    def fail(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "store" / "manifest.json"))

    monkeypatch.setattr(must.cli, "_cmd_label_stats", fail)
    code, err = _run(["label", "stats", str(tmp_path)], tmp_path, capsys)
    assert code == 2
    assert err == f"must: error: {tmp_path / 'store' / 'manifest.json'}: Permission denied\n"


def test_override_values_are_literal_unless_yaml_scalars_or_collections():
    parsed = parse_overrides(
        [
            "data.dataset=/data/run #2",
            "data.cache=/data/a: b",
            "train.lr=0.05",
            "train.max_steps=10",
            "model.heads.detection.levels=[p2, p3]",
            "init=null",
            "data.skip_bad=true",
            "data.name='quoted #1'",
            "note=#not-a-comment",
        ]
    )
    assert parsed["data"] == {
        "dataset": "/data/run #2",
        "cache": "/data/a: b",
        "skip_bad": True,
        "name": "quoted #1",
    }
    assert parsed["train"] == {"lr": 0.05, "max_steps": 10}
    assert parsed["model"]["heads"]["detection"]["levels"] == ["p2", "p3"]
    assert parsed["init"] is None
    assert parsed["note"] == "#not-a-comment"


def test_a_path_override_reaches_the_config_whole(tmp_path):
    path = f"{tmp_path}/run #2: final"
    cfg = load_config(TeachConfig, "teach_segmentation_cpu", [f"data.dataset={path}"])
    assert cfg.data.dataset == path


def test_bad_override_value_is_reported_against_the_command_line():
    with pytest.raises(ConfigError) as err:
        load_config(TeachConfig, "teach_segmentation_cpu", ["train.lr=a: b"])
    assert "command line: train.lr:" in str(err.value)
    assert "line " not in str(err.value).split("command line")[1]


@pytest.mark.parametrize("bad", ["train..lr=1", ".lr=1", "lr"])
def test_malformed_override_keys_are_refused(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([bad])


def test_head_settings_are_checked_with_the_config_before_any_work(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(
            TeachConfig,
            "teach_segmentation_cpu",
            [f"data.dataset={tmp_path / 'missing'}", "model.heads.segmentation.hiden=3"],
        )
    assert "model.heads: Value error, segmentation: hiden: Extra inputs" in str(err.value)
    assert "command line" in str(err.value)


def test_runs_without_a_test_split_print_validation_not_an_empty_test_table(capsys):
    from must.cli import _print_test
    from must.summary import RunInfo

    _print_test(RunInfo.read({"val": {"depth": {"abs_rel": 0.2}}, "test": {}}, "r"), "split 'test'")
    out = capsys.readouterr().out
    assert "test (" not in out  # no heading over an empty table
    assert "no test metrics for all tasks: no 'test' split" in out
    info = RunInfo.read({"test": {"depth": {"abs_rel": 0.2}}, "untested": ["detection"]}, "r")
    _print_test(info, "each teacher's own 'test' split")
    out = capsys.readouterr().out
    assert out.startswith("test (each teacher's own 'test' split):\n")
    assert "abs_rel" in out and "no test metrics for detection" in out
