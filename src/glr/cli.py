"""`glr <stage>`: the one entry point of the pipeline; `dvc.yaml` calls only this."""

from __future__ import annotations

import argparse
import logging
import sys

from glr.commands import COMMANDS
from glr.errors import UserError

log = logging.getLogger("glr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glr",
        description="Google Landmark Retrieval 2021 (2nd place) as a DVC pipeline. "
                    "Each sub-command is one pipeline stage; `dvc repro` runs them in order.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing
    try:
        args.func(args)
    except UserError as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
