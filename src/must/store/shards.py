"""The pseudo-label store: shards of multi-task labels plus a manifest (format ``must-store/1``).

A store is one folder::

    STORE/header.json                what the store is made of (tasks, teachers, settings, images)
    STORE/keys.txt                   the ordered image keys, newline-joined UTF-8
    STORE/shard-00000.safetensors    labels of images [0, shard_size)
    STORE/shard-00000.json           sidecar: that shard's manifest entry and its skipped images
    ...
    STORE/manifest.json              written by ``ShardWriter.finalize()`` from the sidecars

``ShardWriter`` writes shards atomically (temporary name, then rename, sidecar last), so a
killed run never leaves half a shard and a resumed run skips the shards already done; any
process can write any shard. ``PseudoLabelStore`` reads a finished store by image key and
checks each shard against the manifest's SHA-256 the first time it opens it.

The reader half of this file needs only the standard library, NumPy and ``safetensors``: copy
this one file to read a store without the rest of ``must``. The full format is in
``docs/store.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

try:
    from must.errors import ConfigError, DataError
except ImportError:  # this file copied out of the package: same errors, no package needed

    class DataError(ValueError):  # type: ignore[no-redef]
        """A data file or record is unusable; the message names the file and the problem."""

        def __init__(self, path: str | Path, problem: str) -> None:
            self.path = str(path)
            self.problem = problem
            super().__init__(f"{self.path}: {problem}")

    class ConfigError(ValueError):  # type: ignore[no-redef]
        """A configuration value is invalid; the message names it."""


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMAT",
    "IGNORE_INDEX",
    "PseudoLabelStore",
    "Record",
    "ShardWriter",
    "keys_sha256",
    "shard_name",
]

FORMAT = "must-store/1"
HEADER_FILE = "header.json"
KEYS_FILE = "keys.txt"
MANIFEST_FILE = "manifest.json"
DEFAULT_SHARD_SIZE = 256
IGNORE_INDEX = 255  # the ignore value of stored class maps
ORIGINS = ("pseudo", "real")
HEADER_FIELDS = ("format", "tasks", "teachers", "settings", "images", "shard_size")

# The dtypes a field may be stored in (a task's "encoding" in the header names them), and
# their safetensors names. What each task stores is up to the program that writes the store
# (``must`` takes it from its task classes): this file only follows the header.
_ST_DTYPES = {"float16": "F16", "float32": "F32", "int16": "I16", "uint8": "U8"}
_TMP_SUFFIX = ".tmp"


@dataclass
class Record:
    """One image's labels.

    ``labels`` maps task -> field -> array (fields and dtypes as in the header's
    ``tasks[task]["encoding"]["fields"]``); a task the image has no label for is simply absent. ``origin`` maps task -> ``"pseudo"`` or
    ``"real"``; the writer takes ``"pseudo"`` for a labelled task missing from it. ``height``
    and ``width`` are the image's own size (pixel labels may be smaller, see ``label_scale``).
    """

    key: str
    height: int
    width: int
    labels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- shared helpers


def keys_sha256(keys: Sequence[str]) -> str:
    """SHA-256 (hex) of the ordered key list, newline-joined UTF-8: the bytes of ``keys.txt``."""
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def shard_name(index: int) -> str:
    """File name of shard ``index`` (``shard-00000.safetensors``)."""
    return f"shard-{index:05d}.safetensors"


def sidecar_name(index: int) -> str:
    """File name of shard ``index``'s sidecar (``shard-00000.json``)."""
    return f"shard-{index:05d}.json"


def file_sha256(path: str | Path) -> str:
    # Also in must.files: this module stays one self-contained file a user can copy.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_file_problem(path: Path, entry: Mapping[str, Any]) -> str | None:
    """Why the shard file at ``path`` is not the one ``entry`` (manifest or sidecar) describes,
    or None: missing, another size, or another SHA-256."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file missing"
    if size != entry["bytes"]:
        return f"{size} bytes, the manifest says {entry['bytes']}"
    if file_sha256(path) != entry["sha256"]:
        return "sha256 differs from the manifest (the file is damaged)"
    return None


def repair_hint(manifest: Mapping[str, Any], root: str | Path) -> str:
    """How to repair a damaged store: re-run the command that made it, which rewrites only the
    damaged shards. Spelled out when ``must label`` made the store (its header says all)."""
    settings, images = manifest.get("settings") or {}, manifest.get("images") or {}
    teachers = [t.get("path") for t in manifest.get("teachers") or []]
    if "keep_real" not in settings or not images.get("source") or not all(teachers):
        return "re-run the command that made the store: it rewrites only the damaged shards"
    args = ["must", "label"]
    for path in teachers:
        args += ["--teacher", str(path)]
    args += ["--images", str(images["source"])]
    if "split" in images:
        args += ["--split", str(images["split"])]
    args += ["--out", str(root)]
    # must label records each of its settings under its option's name (and keep_real).
    for key, value in settings.items():
        if key != "keep_real":
            args += ["--" + key.replace("_", "-"), repr(value)]
    if settings["keep_real"]:
        args.append("--keep-real")
    args += ["--shard-size", str(manifest.get("shard_size", DEFAULT_SHARD_SIZE))]
    return f"repair it by re-running the command that made it: {shlex.join(args)}"


def _num_shards(count: int, shard_size: int) -> int:
    return math.ceil(count / shard_size)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"unreadable JSON ({e})") from e


def _read_keys(root: Path, images: Mapping[str, Any]) -> list[str]:
    """The ordered key list from ``keys.txt``, checked against the header's count and hash."""
    path = root / KEYS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "missing: the store's image key list is gone") from None
    if hashlib.sha256(data).hexdigest() != images.get("sha256"):
        raise DataError(path, "sha256 differs from images.sha256 in the header/manifest")
    keys = data.decode("utf-8").split("\n") if data else []
    if len(keys) != images.get("count"):
        raise DataError(path, f"{len(keys)} keys, the header says {images.get('count')}")
    return keys


def _read_sidecar(
    root: Path, shard_size: int, count: int, index: int, *, check_sha: bool
) -> dict[str, Any] | None:
    """Shard ``index``'s sidecar if the shard is complete (its file matches the sidecar)."""
    path = root / sidecar_name(index)
    try:
        entry = _read_json(path)
    except (FileNotFoundError, DataError):
        return None
    first = index * shard_size
    try:
        ok = (
            entry["file"] == shard_name(index)
            and entry["first"] == first
            and entry["count"] == min(shard_size, count - first)
            and entry["records"] + len(entry["skipped"]) == entry["count"]
        )
        shard = root / entry["file"]
        ok = ok and shard.is_file() and shard.stat().st_size == entry["bytes"]
        ok = ok and (not check_sha or file_sha256(shard) == entry["sha256"])
    except (KeyError, TypeError, OSError):
        return None
    return entry if ok else None


def _build_manifest(header: Mapping[str, Any], entries: Mapping[int, dict]) -> dict[str, Any]:
    n_shards = _num_shards(header["images"]["count"], header["shard_size"])
    shards, skipped = [], []
    for i in sorted(entries):
        entry = dict(entries[i])
        skipped.extend(entry.pop("skipped"))
        shards.append(entry)
    manifest = {k: header[k] for k in HEADER_FIELDS}
    manifest.update(shards=shards, skipped=skipped, complete=len(shards) == n_shards)
    return manifest


# --------------------------------------------------------------------------- reader


class PseudoLabelStore:
    """Random access, by image key, to a store's labels (NumPy arrays).

    Needs only NumPy and ``safetensors``. Shards are opened lazily with
    ``safe_open(..., framework="numpy")`` (memory-mapped: only the tensors asked for are read)
    and kept open in a small LRU of ``max_open`` handles; loader workers (forked, or sent a
    pickled copy) each open their own.

    A store must be finished (``manifest.json`` with ``complete: true``) unless
    ``allow_incomplete=True``; then the shards written so far are readable, and without a
    manifest (a run still going) the sidecars are read instead.

    Every shard is checked against its SHA-256 (from the manifest, or the sidecar) the first
    time this process opens it (``check_shard``), so a damaged shard is never served: reading
    it raises DataError naming the file and the command that repairs it. ``check_shards()``
    checks them all up front; ``verify()`` also checks their contents.
    """

    def __init__(
        self, root: str | Path, *, allow_incomplete: bool = False, max_open: int = 16
    ) -> None:
        self.root = Path(root)
        self.max_open = max(1, int(max_open))
        path = self.root / MANIFEST_FILE
        if path.is_file():
            manifest = _read_json(path)
        elif allow_incomplete and (self.root / HEADER_FILE).is_file():
            header = _read_json(self.root / HEADER_FILE)
            count, size = header["images"]["count"], header["shard_size"]
            entries = {}
            for i in range(_num_shards(count, size)):
                entry = _read_sidecar(self.root, size, count, i, check_sha=False)
                if entry is not None:
                    entries[i] = entry
            manifest = _build_manifest(header, entries)
        else:
            raise DataError(path, "missing: not a finished pseudo-label store (run finalize())")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise DataError(path, f"format {found!r}, expected {FORMAT!r}")
        self.manifest: dict[str, Any] = manifest
        self.shard_size: int = manifest["shard_size"]
        self.num_shards = _num_shards(manifest["images"]["count"], self.shard_size)
        self._entries = {e["first"] // self.shard_size: e for e in manifest["shards"]}
        if not manifest["complete"] and not allow_incomplete:
            missing = [i for i in range(self.num_shards) if i not in self._entries]
            raise DataError(
                path,
                f"incomplete: {len(missing)} of {self.num_shards} shards missing "
                f"({', '.join(shard_name(i) for i in missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); finish the run or pass "
                "allow_incomplete=True",
            )
        self._skipped = {s["key"]: s for s in manifest["skipped"]}
        self._all_keys = _read_keys(self.root, manifest["images"])
        self._keys = [
            k
            for i, k in enumerate(self._all_keys)
            if i // self.shard_size in self._entries and k not in self._skipped
        ]
        self._index = {k: i for i, k in enumerate(self._all_keys)}
        self._fields = {
            t: list(spec["encoding"]["fields"]) for t, spec in manifest["tasks"].items()
        }
        self._open: OrderedDict[int, tuple[Any, dict[str, dict]]] = OrderedDict()
        self._pid = os.getpid()
        self._checked: set[int] = set()  # shards whose checksum matched (kept across forks)

    # -- what is in it

    @property
    def keys(self) -> list[str]:
        """Keys of the images that have a record, in image-list order (skipped ones left out)."""
        return self._keys

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def teachers(self) -> list[dict[str, Any]]:
        return self.manifest["teachers"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self.manifest["skipped"]

    def kind(self, task: str) -> str:
        return self._task(task)["kind"]

    def classes(self, task: str) -> list[str] | None:
        """The task's class names (index = stored class id), or None (depth)."""
        return self._task(task)["classes"]

    def _task(self, task: str) -> dict[str, Any]:
        try:
            return self.manifest["tasks"][task]
        except KeyError:
            raise KeyError(f"no task {task!r} in this store (tasks: {self.tasks})") from None

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        i = self._index.get(key) if isinstance(key, str) else None
        return i is not None and i // self.shard_size in self._entries and key not in self._skipped

    # -- reading

    def get(self, key: str) -> Record:
        """The record of image ``key``; KeyError (saying why) if it has none."""
        i = self._index.get(key)
        if i is None:
            raise KeyError(f"{key!r} is not in this store's image list")
        if key in self._skipped:
            raise KeyError(f"{key!r} was skipped when the store was made: {self._skipped[key]}")
        shard = i // self.shard_size
        if shard not in self._entries:
            raise KeyError(f"{key!r} belongs to {shard_name(shard)}, which is not written yet")
        handle, records = self._shard(shard)
        meta = records.get(key)
        if meta is None:
            raise DataError(self.root / shard_name(shard), f"no record for {key!r}")
        labels = {
            task: {f: handle.get_tensor(f"{key}/{f}") for f in self._fields[task]}
            for task in meta["tasks"]
        }
        return Record(key, meta["height"], meta["width"], labels, dict(meta["tasks"]))

    __getitem__ = get

    def _shard(self, index: int) -> tuple[Any, dict[str, dict]]:
        if os.getpid() != self._pid:  # forked: never share file handles with the parent
            self._open.clear()
            self._pid = os.getpid()
        hit = self._open.get(index)
        if hit is not None:
            self._open.move_to_end(index)
            return hit
        self.check_shard(index)
        path = self.root / shard_name(index)
        try:
            handle = safe_open(str(path), framework="numpy")
            records = json.loads(handle.metadata()["records"])
        except Exception as e:
            raise DataError(path, f"unreadable shard ({e})") from e
        hit = (handle, {r["key"]: r for r in records})
        self._open[index] = hit
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return hit

    def close(self) -> None:
        """Drop the open shard handles (they are reopened on demand)."""
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for loader workers started by spawn or forkserver: open shard handles do
        # not cross (each process opens its own); the shards already checked stay checked.
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def check_shard(self, index: int) -> None:
        """Check shard ``index``'s file against its recorded size and SHA-256, once per
        process; DataError naming the file and the repair command if it differs."""
        if index in self._checked:
            return
        entry = self._entries[index]
        path = self.root / entry["file"]
        problem = _shard_file_problem(path, entry)
        if problem is not None:
            raise DataError(path, f"{problem}; {repair_hint(self.manifest, self.root)}")
        self._checked.add(index)

    def check_shards(self) -> None:
        """``check_shard`` every shard written (what a reader that will use them all calls
        before it starts)."""
        for index in sorted(self._entries):
            self.check_shard(index)

    # -- checks

    def verify(self) -> list[str]:
        """Recompute every checksum and check every shard's contents; one line per problem."""
        problems: list[str] = []
        images = self.manifest["images"]
        try:
            _read_keys(self.root, images)
        except DataError as e:
            problems.append(str(e))
        for i in range(self.num_shards):
            entry = self._entries.get(i)
            if entry is None:
                problems.append(f"{shard_name(i)}: missing (store incomplete)")
                continue
            problem = _shard_file_problem(self.root / entry["file"], entry)
            if problem is not None:
                problems.append(f"{entry['file']}: {problem}")
                continue
            self._checked.add(i)
            problems.extend(self._verify_contents(i, entry))
        return problems

    def _verify_contents(self, index: int, entry: dict[str, Any]) -> list[str]:
        name = entry["file"]
        try:
            with safe_open(str(self.root / name), framework="numpy") as f:
                records = json.loads(f.metadata()["records"])
                names = f.keys()  # safe_open has no __iter__
                present = {n: f.get_slice(n) for n in names}
                shapes = {n: s.get_shape() for n, s in present.items()}
                dtypes = {n: s.get_dtype() for n, s in present.items()}
        except Exception as e:
            return [f"{name}: unreadable ({e})"]
        problems = []
        first = entry["first"]
        expected = [
            k for k in self._all_keys[first : first + entry["count"]] if k not in self._skipped
        ]
        if [r["key"] for r in records] != expected:
            problems.append(f"{name}: its records are not the images of its slice minus skipped")
        if len(records) != entry["records"]:
            problems.append(f"{name}: {len(records)} records, manifest says {entry['records']}")
        wanted = set()
        for r in records:
            for task, origin in r["tasks"].items():
                if task not in self._fields or origin not in ORIGINS:
                    problems.append(f"{name}: {r['key']!r}: unknown task or origin {task}={origin}")
                    continue
                spec = self.manifest["tasks"][task]
                for f, dtype in spec["encoding"]["fields"].items():
                    tname = f"{r['key']}/{f}"
                    wanted.add(tname)
                    if tname not in dtypes:
                        problems.append(f"{name}: tensor {tname!r} missing")
                    elif dtypes[tname] != _ST_DTYPES[dtype]:
                        problems.append(f"{name}: {tname!r} is {dtypes[tname]}, not {dtype}")
                    elif (
                        f == "cls_probs"
                        and spec["classes"] is not None
                        and shapes[tname] != [len(spec["classes"])]
                    ):
                        problems.append(f"{name}: {tname!r} has shape {shapes[tname]}")
        extra = sorted(set(dtypes) - wanted)
        if extra:
            problems.append(f"{name}: {len(extra)} tensors no record names, e.g. {extra[0]!r}")
        return problems

    def summary(self) -> dict[str, Any]:
        """Counts for people and logs: images, records, skipped, shards, labels per task."""
        m = self.manifest
        tasks = {}
        for task, spec in m["tasks"].items():
            counts = {o: sum(e["labels"][task][o] for e in m["shards"]) for o in ORIGINS}
            classes = spec["classes"]
            n_classes = None if classes is None else len(classes)
            tasks[task] = {"kind": spec["kind"], "classes": n_classes, **counts}
        return {
            "root": str(self.root),
            "format": m["format"],
            "complete": m["complete"],
            "images": m["images"]["count"],
            "records": sum(e["records"] for e in m["shards"]),
            "skipped": len(m["skipped"]),
            "shards": {"written": len(m["shards"]), "total": self.num_shards},
            "shard_size": self.shard_size,
            "bytes": sum(e["bytes"] for e in m["shards"]),
            "tasks": tasks,
            "teachers": [{k: t.get(k) for k in ("path", "sha256", "tasks")} for t in m["teachers"]],
            "settings": m["settings"],
        }

    def __repr__(self) -> str:
        return f"PseudoLabelStore({str(self.root)!r}, {len(self)} records, tasks={self.tasks})"


# --------------------------------------------------------------------------- writer


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"store header: {what}: {e}") from e


def _normalize_header(
    header: Mapping[str, Any], keys: list[str] | None, stored: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Check the header and fill its defaults; JSON-normalised, fields in canonical order.

    ``images.count``/``sha256`` come from ``keys``, else from the ``stored`` header (a store
    reopened without its key list).
    """
    if not isinstance(header, Mapping):
        raise ConfigError("store header: must be a dict")
    unknown = sorted(set(header) - set(HEADER_FIELDS))
    if unknown:
        raise ConfigError(f"store header: unknown fields {unknown} (allowed: {HEADER_FIELDS})")
    h = _jsonable(dict(header), "header")
    fmt = h.get("format", FORMAT)
    if fmt != FORMAT:
        raise ConfigError(f"store header: format {fmt!r}, this writer writes {FORMAT!r}")

    tasks = h.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError("store header: tasks must be a non-empty dict task -> {kind, classes}")
    out_tasks, kinds = {}, {}
    for name, spec in tasks.items():
        spec = spec or {}
        if not isinstance(spec, dict):
            raise ConfigError(f"store header: tasks.{name} must be a dict")
        kind = spec.get("kind", name)
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"store header: tasks.{name}.kind must be a name, not {kind!r}")
        if kind in kinds:
            raise ConfigError(
                f"store header: tasks {kinds[kind]!r} and {name!r} are both {kind}; a store "
                "holds one task of each kind"
            )
        kinds[kind] = name
        classes = spec.get("classes")
        if classes is not None and (
            not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
        ):
            raise ConfigError(f"store header: tasks.{name}.classes must be a list of names")
        encoding = spec.get("encoding") or {}
        fields = encoding.get("fields") if isinstance(encoding, dict) else None
        if not isinstance(fields, dict) or not fields:
            raise ConfigError(
                f"store header: tasks.{name}.encoding.fields: give the fields stored per image "
                f"and their dtypes ({', '.join(_ST_DTYPES)})"
            )
        for f, dtype in fields.items():
            if not f or "/" in f or dtype not in _ST_DTYPES:
                raise ConfigError(
                    f"store header: tasks.{name}.encoding.fields.{f}: a name without '/' and "
                    f"one of the dtypes {list(_ST_DTYPES)}, not {dtype!r}"
                )
        extra = sorted(set(spec) - {"kind", "classes", "encoding"})
        if extra:
            raise ConfigError(f"store header: tasks.{name}: unknown fields {extra}")
        out_tasks[name] = {"kind": kind, "classes": classes, "encoding": encoding}

    teachers = h.get("teachers", [])
    if not isinstance(teachers, list) or not all(isinstance(t, dict) for t in teachers):
        raise ConfigError("store header: teachers must be a list of dicts")
    for i, t in enumerate(teachers):
        for k in ("path", "sha256"):
            if k not in t:
                raise ConfigError(f"store header: teachers[{i}] has no {k!r}")
    settings = h.get("settings", {})
    if not isinstance(settings, dict):
        raise ConfigError("store header: settings must be a dict")

    images = dict(h.get("images") or {})
    if keys is not None:
        for k, v in (("count", len(keys)), ("sha256", keys_sha256(keys))):
            if images.setdefault(k, v) != v:
                raise ConfigError(
                    f"store header: images.{k} is {images[k]!r} but the keys given give {v!r}"
                )
    elif stored is not None:
        for k in ("count", "sha256"):
            images.setdefault(k, stored.get("images", {}).get(k))
    if not isinstance(images.get("count"), int) or not isinstance(images.get("sha256"), str):
        raise ConfigError("store header: images needs count and sha256 (or pass keys=)")
    images.setdefault("source", "")
    images = {"count": images.pop("count"), "sha256": images.pop("sha256"), **images}

    shard_size = h.get("shard_size", DEFAULT_SHARD_SIZE)
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ConfigError(f"store header: shard_size must be a positive integer, not {shard_size}")
    return {
        "format": fmt,
        "tasks": out_tasks,
        "teachers": teachers,
        "settings": settings,
        "images": images,
        "shard_size": shard_size,
    }


def _diff(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths where two JSON values differ, with both values (shortened)."""

    def show(v: Any) -> str:
        s = json.dumps(v)
        return s if len(s) <= 80 else s[:77] + "..."

    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            path = f"{where}.{k}" if where else str(k)
            if k not in new:
                out.append(f"{path} (stored {show(old[k])}, new: absent)")
            elif k not in old:
                out.append(f"{path} (stored: absent, new {show(new[k])})")
            else:
                out.extend(_diff(old[k], new[k], path))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [d for i, (a, b) in pairs for d in _diff(a, b, f"{where}[{i}]")]
    if old != new or isinstance(old, bool) != isinstance(new, bool):
        return [f"{where or '(header)'} (stored {show(old)}, new {show(new)})"]
    return []


# Temporaries are named after their writer (host, pid), so that finalize() removes only those
# whose writer is gone: another writer of the same store may be running at the same time.
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]
_TMP_OWNER = re.compile(r"\.(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def _tmp_path(path: Path) -> Path:
    name = f"{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
    return path.with_name(name)


def _writer_gone(tmp: Path) -> bool:
    """True when the process that named ``tmp`` is known to have ended (same host, no such
    pid); False when it runs, or runs on another host, or the name does not say."""
    m = _TMP_OWNER.search(tmp.name)
    if m is None or (m["host"] is not None and m["host"] != _HOST) or os.name == "nt":
        return False  # (on Windows, os.kill would end the process rather than ask about it)
    pid = int(m["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):  # someone else's process, or no way to ask
        return False
    return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems / platforms cannot fsync this
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _store_files(root: Path) -> list[Path]:
    """Every file a store consists of (or left behind): what ``overwrite=True`` removes."""
    names = (HEADER_FILE, KEYS_FILE, MANIFEST_FILE)
    out = [root / n for n in names if (root / n).exists()]
    out += sorted(root.glob("shard-*.safetensors")) + sorted(root.glob("shard-*.json"))
    return out + _temporaries(root)


def _temporaries(root: Path) -> list[Path]:
    prefixes = ("shard-", HEADER_FILE, KEYS_FILE, MANIFEST_FILE)
    return sorted(p for p in root.glob(f"*{_TMP_SUFFIX}") if p.name.startswith(prefixes))


class _Check:
    """Builds the messages for one record's problems (raised as DataError naming the shard)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key

    def fail(self, what: str) -> DataError:
        return DataError(self.path, f"record {self.key!r}: {what}")

    def array(
        self, value: Any, task: str, name: str, dtype: str, ndim: int | None = None
    ) -> np.ndarray:
        """``value`` as a contiguous ``dtype`` array (with ``ndim`` dimensions, if given):
        floats cast and checked finite, integers checked in range; else ``fail``."""
        a = np.asarray(value)
        where = f"{task}.{name}"
        if ndim is not None and a.ndim != ndim:
            raise self.fail(f"{where} must have {ndim} dimensions, has shape {a.shape}")
        if a.dtype.kind not in ("fiu" if dtype.startswith("float") else "iu"):
            raise self.fail(f"{where} has dtype {a.dtype}, expected {dtype}")
        if dtype.startswith("float"):
            with np.errstate(over="ignore", invalid="ignore"):
                a = np.ascontiguousarray(a, dtype=dtype)
            if not np.isfinite(a).all():
                limit = f" (max {np.finfo(dtype).max:g})" if dtype == "float16" else ""
                raise self.fail(f"{where} has values that are not finite as {dtype}{limit}")
            return a
        info = np.iinfo(dtype)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise self.fail(f"{where} has values outside {dtype}")
        return np.ascontiguousarray(a, dtype=dtype)


# Checks one image's fields for one task: (check, task name, given fields) -> the arrays to
# store, in the encoding's dtypes; raises ``check.fail(message)`` for a bad field.
Checker = Callable[["_Check", str, Mapping[str, Any]], Mapping[str, np.ndarray]]


class ShardWriter:
    """Writes a store: one shard per call, atomically; any process can write any shard.

    ``header`` holds the manifest fields that are not per shard: ``format`` (default
    ``must-store/1``), ``tasks`` (task -> ``{"kind", "classes", "encoding"}``; kind defaults
    to the task name; ``encoding["fields"]`` maps each field stored per image to its dtype),
    ``teachers`` (list of ``{"path", "sha256", "tasks", "classes"}``), ``settings`` (free
    dict: thresholds, temperatures, ``label_scale``...), ``images`` (``{"count", "sha256",
    "source"}``; count and sha256 are filled from ``keys``) and ``shard_size`` (default 256).
    (``must.store.ShardWriter`` fills in the encodings and checkers of ``must``'s tasks.)

    ``checkers`` (task name -> :data:`Checker`) check and convert one image's fields of a
    task: shapes, value ranges, class ids. A task without one gets its fields checked by name
    and converted to their dtypes only.

    ``keys`` is the ordered image list (shard ``i`` = images ``[i*shard_size,
    (i+1)*shard_size)``): required to create a store, optional when reopening one (then
    ``keys.txt`` is read and checked). Reopening a store whose ``header.json`` differs from
    ``header`` raises ConfigError naming each differing field, unless ``overwrite=True``: then
    the old store's files are removed first.
    """

    def __init__(
        self,
        root: str | Path,
        header: Mapping[str, Any],
        keys: Sequence[str] | None = None,
        *,
        overwrite: bool = False,
        checkers: Mapping[str, Checker] | None = None,
    ) -> None:
        self.checkers = dict(checkers or {})
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if keys is not None:
            keys = self._check_keys(keys)
        header_path = self.root / HEADER_FILE
        if overwrite:
            for p in _store_files(self.root):
                p.unlink(missing_ok=True)
        stored = _read_json(header_path) if header_path.is_file() else None
        if stored is None:
            leftovers = [
                p.name
                for p in _store_files(self.root)
                if p.name != KEYS_FILE and not p.name.endswith(_TMP_SUFFIX)
            ]
            if leftovers and header_path.is_file():  # another writer created it just now
                stored = _read_json(header_path)
            elif leftovers:
                raise ConfigError(
                    f"{self.root}: holds store files ({', '.join(leftovers[:3])}...) but no "
                    f"{HEADER_FILE}; pass overwrite=True to replace them"
                )
        new = _normalize_header(header, keys, stored)
        if stored is not None:
            diffs = _diff(stored, new)
            if diffs:
                raise ConfigError(
                    f"{header_path}: this store was made with another header; differs at: "
                    + "; ".join(diffs)
                    + ". Use another folder, or overwrite=True to replace the store."
                )
            self.header: dict[str, Any] = stored
            on_disk = _read_keys(self.root, stored["images"])
            if keys is not None and keys != on_disk:  # same hash, so never in practice
                raise ConfigError(f"{self.root / KEYS_FILE}: differs from the keys given")
            keys = on_disk
        else:
            if keys is None:
                raise ConfigError(f"{self.root}: a new store needs its image list (keys=)")
            # keys.txt first: header.json is what marks the folder as a store.
            _atomic_write(self.root / KEYS_FILE, "\n".join(keys).encode("utf-8"))
            _atomic_write(header_path, _json_bytes(new))
            self.header = new
        self.keys: list[str] = keys
        self.shard_size: int = self.header["shard_size"]
        self.num_shards = _num_shards(len(keys), self.shard_size)

    @staticmethod
    def _check_keys(keys: Sequence[str]) -> list[str]:
        keys = list(keys)
        for k in keys:
            if not isinstance(k, str) or not k or "\n" in k:
                raise ConfigError(f"image key {k!r}: keys are non-empty strings without newlines")
        seen: set[str] = set()
        for k in keys:
            if k in seen:
                raise ConfigError(f"image key {k!r} appears more than once")
            seen.add(k)
        return keys

    def shard_keys(self, index: int) -> list[str]:
        """The image keys shard ``index`` must cover, in order."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range: this store has {self.num_shards}")
        first = index * self.shard_size
        return self.keys[first : first + self.shard_size]

    def done_shards(self) -> set[int]:
        """Shards that are complete: sidecar present and the shard's checksum matches it."""
        return {i for i in range(self.num_shards) if self._entry(i, check_sha=True) is not None}

    def _entry(self, index: int, *, check_sha: bool) -> dict[str, Any] | None:
        return _read_sidecar(self.root, self.shard_size, len(self.keys), index, check_sha=check_sha)

    def write_shard(
        self, index: int, records: Sequence[Record], skipped: Sequence[Mapping[str, Any]] = ()
    ) -> dict[str, Any]:
        """Write shard ``index`` and then its sidecar, each atomically; return the sidecar.

        ``records`` and ``skipped`` (``{"key", "path", "reason"}``, images that could not be
        labelled) must together cover the shard's images exactly once, in any order. Arrays
        are converted to the stored dtypes (floats to float16/float32; integer fields must
        be integers in range); a record that breaks the format raises DataError naming it.
        """
        slice_keys = self.shard_keys(index)
        path = self.root / shard_name(index)
        positions = {k: index * self.shard_size + j for j, k in enumerate(slice_keys)}
        by_key: dict[str, Any] = {}
        skipped_out = []
        for s in skipped:
            if not isinstance(s, Mapping) or "key" not in s:
                raise DataError(path, f"skipped entry {s!r} has no 'key'")
            entry = _jsonable({"key": s["key"], "path": "", "reason": "", **s}, "skipped")
            by_key.setdefault(entry["key"], []).append(entry)
            skipped_out.append(entry)
        for r in records:
            by_key.setdefault(r.key, []).append(r)
        for k, items in by_key.items():
            if k not in positions:
                raise DataError(path, f"{k!r} is not one of this shard's images")
            if len(items) > 1:
                raise DataError(path, f"{k!r} appears {len(items)} times in records/skipped")
        missing = [k for k in slice_keys if k not in by_key]
        if missing:
            raise DataError(
                path, f"{len(missing)} images neither recorded nor skipped, e.g. {missing[0]!r}"
            )
        skipped_out.sort(key=lambda s: positions[s["key"]])

        tensors: dict[str, np.ndarray] = {}
        metas = []
        counts = {t: dict.fromkeys(ORIGINS, 0) for t in self.header["tasks"]}
        for r in sorted(records, key=lambda r: positions[r.key]):
            meta, arrays = self._prepare(path, r)
            meta["index"] = positions[r.key]
            metas.append(meta)
            tensors.update(arrays)
            for task, origin in meta["tasks"].items():
                counts[task][origin] += 1

        # One metadata entry only: safetensors writes the metadata map in hash order, so more
        # entries would make a shard's bytes (and checksum) vary from one writer to the next.
        metadata = {"records": json.dumps(metas, ensure_ascii=False, separators=(",", ":"))}
        tmp = _tmp_path(path)
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            _fsync(tmp)
            entry = {
                "file": path.name,
                "first": index * self.shard_size,
                "count": len(slice_keys),
                "records": len(metas),
                "sha256": file_sha256(tmp),
                "bytes": tmp.stat().st_size,
                "labels": counts,
                "skipped": skipped_out,
            }
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _atomic_write(self.root / sidecar_name(index), _json_bytes(entry))
        return entry

    def _prepare(self, path: Path, r: Record) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        c = _Check(path, r.key)
        for name, v in (("height", r.height), ("width", r.width)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise c.fail(f"{name} must be a positive integer, not {v!r}")
        tasks = self.header["tasks"]
        unknown = sorted(set(r.labels) - set(tasks)) + sorted(set(r.origin) - set(r.labels))
        if unknown:
            raise c.fail(f"labels/origin for tasks {unknown} (store tasks: {list(tasks)})")
        origins, arrays = {}, {}
        for task in tasks:  # header order, so every shard lists tasks alike
            if task not in r.labels:
                continue
            origin = r.origin.get(task, "pseudo")
            if origin not in ORIGINS:
                raise c.fail(f"origin of {task} is {origin!r}, not one of {ORIGINS}")
            origins[task] = origin
            spec = tasks[task]
            fields = spec["encoding"]["fields"]
            given = r.labels[task]
            if set(given) != set(fields):
                raise c.fail(f"{task} needs fields {sorted(fields)}, got {sorted(given)}")
            checker = self.checkers.get(task)
            if checker is None:
                out = {f: c.array(given[f], task, f, dtype) for f, dtype in fields.items()}
            else:
                out = checker(c, task, given)
                got = {f: str(np.asarray(a).dtype) for f, a in out.items()}
                if got != fields:
                    raise c.fail(f"{task}: its checker gave {got}, the encoding is {fields}")
            arrays.update({f"{r.key}/{f}": a for f, a in out.items()})
        meta = {"key": r.key, "index": -1, "height": int(r.height), "width": int(r.width)}
        meta["tasks"] = origins
        return meta, arrays

    def finalize(self, *, stale_after: float = 3600.0) -> Path:
        """Merge the complete shards' sidecars into ``manifest.json`` (written atomically).

        ``complete`` is true only when every shard of the image list is there. Temporaries
        left by killed writers are removed: those whose writer (named in the temporary's name)
        has ended on this host, and any older than ``stale_after`` seconds. A temporary of a
        writer still running is its own to rename or remove, even once the store is complete:
        several processes (ranks, or the same command started twice) may write at once.
        """
        entries = {}
        for i in range(self.num_shards):
            entry = self._entry(i, check_sha=True)
            if entry is not None:
                entries[i] = entry
        manifest = _build_manifest(self.header, entries)
        now = time.time()
        for tmp in _temporaries(self.root):
            try:
                old = now - tmp.stat().st_mtime > stale_after
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
            if old or _writer_gone(tmp):
                tmp.unlink(missing_ok=True)
        path = self.root / MANIFEST_FILE
        data = _json_bytes(manifest)
        # A complete store re-run writes nothing (it may sit in a read-only folder).
        if not (path.is_file() and path.read_bytes() == data):
            _atomic_write(path, data)
        return path
