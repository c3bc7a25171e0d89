"""``python -m must``: the same as the ``must`` command."""

from must.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
