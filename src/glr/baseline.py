"""Stage `baseline`: the starting weights' own retrieval, so that `dvc metrics show` says what
training added.

Per backbone: features of the validation queries and the evaluation index with the model
training starts from (`models/<backbone>/pretrained`: ImageNet weights, or seeded random ones
with `model.pretrained: false`), extracted as `extract` does (same size, scales, precision and
resumable parts), then the exact plain search, queries × index, top `retrieve.k`. No
references: the plain search needs none, so on GLDv2's validation this is 1,129 + 78,959
images per backbone, 1.7% of the 4.8M references that `extract` also does. `evaluate`
scores the ranking as `<backbone>.pretrained.map100`.

Writes `data/baseline/<backbone>/`:

    query.npy, index.npy, query.parquet, index.parquet, info.json   as `extract` writes them
    topk.parquet                     id, images (top-k index ids), scores: the plain search
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from glr import files
from glr.params import Params

log = logging.getLogger(__name__)

STARTING_MODEL = "pretrained"  # models/<backbone>/pretrained, written by `glr init`
RANKING = "topk.parquet"


def plain_ranking(folder: Path, k: int, block_rows: int) -> pd.DataFrame:
    """The exact cosine top-k of the queries in the index, from a features folder, a chunk of
    queries at a time (the retrieve stage's arithmetic)."""
    from glr import rerank
    from glr.retrieve import query_chunks, ranking_table  # torch: only where searches run

    folder = Path(folder)
    queries = np.load(folder / "query.npy").astype(np.float32)
    index = np.load(folder / "index.npy", mmap_mode="r")
    query_ids = pq.read_table(folder / "query.parquet").column("id").to_pylist()
    index_ids = pq.read_table(folder / "index.parquet").column("id").to_pylist()
    chunks = [rerank.top_k_ids(rerank.cosine_scores(queries[rows], index,
                                                    block_rows=block_rows), k)
              for rows in query_chunks(len(queries), len(index))]
    return ranking_table(np.concatenate([ids for ids, _ in chunks]),
                         np.concatenate([scores for _, scores in chunks]),
                         query_ids, index_ids)


def main(params: Params, backbone: str, shard_dir: Path, models_dir: Path, out_dir: Path,
         runs_dir: Path, argv: list[str] | None = None) -> None:
    """Features of the queries and the index with MODELS/<backbone>/pretrained into `out_dir`
    (under torchrun when params extract.processes > 1, `argv` being this command's), then,
    on the first process, their exact plain search into `out_dir`/topk.parquet."""
    from glr import extract

    out_dir = Path(out_dir)
    extract.main(params, backbone, shard_dir, models_dir, out_dir, runs_dir,
                 phase=STARTING_MODEL, argv=argv, sets=("query", "index"))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun the first process searches
    table = plain_ranking(out_dir, params.retrieve.k, params.retrieve.block_rows)
    files.write_parquet(out_dir / RANKING, table)
    log.info("%s: plain search with its starting weights (%s) -> %s", backbone,
             Path(models_dir) / backbone / STARTING_MODEL, out_dir / RANKING)


def ranking_path(baseline_dir: Path, backbone: str) -> Path:
    """Where the stage writes a backbone's ranking (evaluate reads it without importing torch)."""
    return Path(baseline_dir) / backbone / RANKING
