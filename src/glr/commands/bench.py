"""`glr bench …`: the benchmarks. They live in the top-level `benchmarks` package, outside the
product; their parsers come from `benchmarks.cli`, their code is imported only when one runs."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    """Register `glr bench` and its benchmarks under `glr`."""
    from benchmarks.cli import add_parser as add_benchmarks

    add_benchmarks(subparsers)
