"""Errors that name what is wrong and where."""

from __future__ import annotations

from pathlib import Path


class MustError(Exception):
    """Base class for errors a user can act on (printed without a traceback by the CLI)."""


class DataError(MustError, ValueError):
    """A data file or record is unusable; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        if problem is None:
            # Rebuilt from one message: a DataLoader worker re-raises ``type(msg)`` with its
            # whole traceback as the message; keep only the error's own line from it.
            text = str(path).rstrip().splitlines()[-1] if str(path).strip() else ""
            text = text.split(f"{type(self).__name__}: ", 1)[-1]
            path, _, problem = text.partition(": ")
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(MustError, ValueError):
    """A configuration file or value is invalid; the message names the file and the key."""


def nearest_line(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of the key path ``loc`` in a YAML file, else of its closest parent there."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def describe_validation_error(
    err, lines: dict[tuple, int] | None = None, from_command_line: set[tuple] | None = None
) -> str:
    """One line per invalid field of a pydantic ValidationError, naming the dotted key and,
    given ``lines`` (key path -> line in the YAML file), the nearest line it comes from; a key
    (or a parent of it) in ``from_command_line`` is said to come from the command line."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        cli = from_command_line or set()
        line = nearest_line(lines or {}, loc)
        at = f"line {line}: " if line is not None and lines else ""
        if any(loc[:n] in cli for n in range(1, len(loc) + 1)):
            at = "command line: "
        elif any(key[: len(loc)] == loc for key in cli):  # a check over several keys
            at = f"command line or {at}" if at else "command line: "
        out.append(f"  {at}{where}: {e['msg']}")
    return "\n".join(out)
