"""Pieces the commands' parsers share."""

from __future__ import annotations

import argparse
from pathlib import Path

from glr.params import DEFAULT_PARAMS


def add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                        help="params file (default: %(default)s)")


def image_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT`, both at least 32, for argparse."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 800x600, got {text!r}") from None
    if min(width, height) < 32:
        raise argparse.ArgumentTypeError("both sides must be at least 32 pixels")
    return width, height
