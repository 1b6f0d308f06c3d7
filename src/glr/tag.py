"""Stage `tag`: the Landmark-Country tags of the evaluation index images, per backbone.

The rerank (glr.rerank) tags every index image with the label and country of its top-1
reference by cosine. On GLDv2 that is 761,757 × 4.9M products of d = 512 per backbone, about
4 PFLOP: hours on a CPU. The tags depend only on the index and reference features, so they are
a stage of their own: a rerank, ensemble or query experiment (`dvc exp run -S
retrieve.alpha=0.5`) reuses them, and the retrieve stage searches the references for the
queries only.

The search is exact on every `retrieve.device` / `retrieve.precision` backend (glr.search), so
the tags do not depend on where they were computed; the reference matrix (memory-mapped
float16) is streamed in blocks of `retrieve.block_rows` rows. Memory: the index features in
float32 (1.6 GB on GLDv2) and one converted block.

Writes `data/tags/<backbone>.parquet`: id, label, country of every index image (its top-1
reference's), in the order of the index features.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from glr import files, search
from glr.errors import UserError
from glr.params import Params

log = logging.getLogger(__name__)


def country_codes(ref_countries: pd.Series) -> dict[str, int]:
    """Country name → code: the references' countries, sorted (the rerank compares codes)."""
    return {name: code for code, name in enumerate(sorted(ref_countries.unique()))}


def index_tag_table(index_ids: list[str], index: np.ndarray, references: np.ndarray,
                    ref_labels: np.ndarray, ref_countries: pd.Series, *, block_rows: int,
                    backend: search.Backend | None = None, progress: bool = False
                    ) -> pd.DataFrame:
    """id, label, country of each index image: its top-1 reference's (exact cosine)."""
    (_, top1), = search.multi_topk([(index, 1)], references, block_rows=block_rows,
                                   backend=backend, progress=progress)
    nearest = top1[:, 0]
    return pd.DataFrame({"id": index_ids,
                         "label": np.asarray(ref_labels, dtype=np.int64)[nearest],
                         "country": ref_countries.to_numpy(dtype=object)[nearest]})


def read_index_tags(path: Path, index_ids: list[str], codes: dict[str, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, country codes) of the index images, in `index_ids` order, from the stage's
    table; a country the references lack gets -1 (it matches no query's tag)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no index tags; run `dvc repro tag` first")
    table = pd.read_parquet(path)
    if table["id"].tolist() != index_ids:
        raise UserError(f"{path}: its index ids differ from the cached features'; rerun "
                        "`dvc repro tag`")
    countries = table["country"].map(codes).fillna(-1).to_numpy(dtype=np.int64)
    return table["label"].to_numpy(dtype=np.int64), countries


def main(params: Params, backbone: str, features_dir: Path, out_dir: Path,
         backend: search.Backend | None = None) -> Path:
    """Tag the index images of `backbone` from its cached features; the table's path."""
    from glr.retrieve import load_features  # retrieve reads this stage's tables

    settings = params.retrieve
    backend = backend or search.select_backend(settings.device, settings.precision)
    features = load_features(Path(features_dir) / backbone)
    log.info("%s: tagging %d index images with their top-1 of %d references on %s", backbone,
             len(features.index), len(features.ref), backend.name)
    table = index_tag_table(features.index_ids, features.index, features.ref,
                            features.ref_labels, features.ref_countries,
                            block_rows=settings.block_rows, backend=backend, progress=True)
    out = Path(out_dir) / f"{backbone}.parquet"
    files.write_parquet(out, table)
    log.info("%s: reference searches: %s", backbone, backend.stats.describe())
    log.info("wrote %s (%d index images, %d distinct labels)", out, len(table),
             table["label"].nunique())
    return out
