"""`python -m shoal.federated fed ...`: the same commands as `shoal fed ...`, without the rest of the CLI."""

from __future__ import annotations

import argparse
import sys

from shoal.config import ConfigError
from shoal.federated.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"shoal: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
