"""Files written whole or not at all: a stage killed mid-write never leaves a half-written
file under its real name (the next run would take it for finished)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside `path` (ending in `suffix`, for writers that append one, like
    `np.save`) that replaces `path` once the block has written it. The replacement is a new
    file, so an old `path` that is a read-only link into DVC's cache is never written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: dict, indent: int = 2) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


def write_parquet(path: Path, table: pa.Table | pd.DataFrame) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic(path) as tmp:
        pq.write_table(table, tmp)
