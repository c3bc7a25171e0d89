"""Errors that name what is wrong and where."""

from __future__ import annotations

from pathlib import Path


class MustError(Exception):
    """Base class for errors a user can act on (printed without a traceback by the CLI)."""


class DataError(MustError, ValueError):
    """A data file or record is unusable; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(MustError, ValueError):
    """A configuration file or value is invalid; the message names the file and the key."""


def describe_validation_error(err) -> str:
    """One line per invalid field of a pydantic ValidationError, naming the dotted key."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)
