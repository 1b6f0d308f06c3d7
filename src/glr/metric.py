"""The official Google Landmark Retrieval metric (mAP@100) and the precision/recall around it.

Definitions, for one scored query q with ground truth G_q and predictions p_1..p_n, cut at k
(100 in the competition):

* A prediction is a *hit* at rank r (r <= k) when p_r is in G_q and did not already appear
  among p_1..p_{r-1}. A repeated prediction is neither hit nor miss, but it still occupies its
  rank, so it still counts in the rank denominator below.
* hits(r) = the number of hits among the first r predictions.
* AP@k(q) = (1 / min(|G_q|, k)) * sum over hit ranks r of hits(r) / r.
* precision@c(q) = hits(c) / c, for c <= k (divided by c even when fewer than c predictions).
* recall@k(q) = hits(k) / |G_q|.

Over a solution, every mean is taken over its *scored* queries (Usage "Public" or "Private"):
a scored query absent from the submission counts as an empty prediction list (all of its
values are 0), a submitted "Ignored" query is skipped, and a submitted id that the solution does
not know is an error (`MetricError`). mAP is also reported for Public and Private separately,
each averaged over its own queries. This matches the Kaggle scorer, DELF's
`compute_retrieval_metrics` (`MeanAveragePrecision`, `MeanPrecisions`).

File formats (`read_solution_csv`, `read_submission_csv`, `write_submission_csv`):

    solution:   id,images,Usage   images = space-separated ids; "None" or empty when Ignored
    submission: id,images         images = space-separated ids, possibly empty

Both readers refuse, with a `MetricError` naming the file and the row (or byte), what they cannot
read faithfully: a row with more cells than the header (ids separated by commas), text that is
not UTF-8, a cell over the csv module's field size limit. A solution without a Public or Private
query is refused too: there is nothing to score.

The module is pure Python: no torch, no numpy.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glr.errors import MetricError

PUBLIC, PRIVATE, IGNORED = "Public", "Private", "Ignored"
USAGES = (PUBLIC, PRIVATE, IGNORED)
SCORED_USAGES = (PUBLIC, PRIVATE)
# Precision cut-offs reported besides @k itself (only those <= k).
PRECISION_CUTOFFS = (1, 5, 10)
# What the GLDv2 solution file writes in the images cell of an Ignored query.
NO_IMAGES = "None"

StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class Query:
    """One row of the solution: its Usage and the ids of its ground-truth index images."""

    usage: str
    truth: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        """Check the Usage, and that a scored query has ground truth (its AP would be 0/0)."""
        if self.usage not in USAGES:
            raise MetricError(f"unknown Usage {self.usage!r} (expected one of {USAGES})")
        # Accept any iterable of ids from callers, but store the immutable set the type promises.
        if not isinstance(self.truth, frozenset):
            object.__setattr__(self, "truth", frozenset(self.truth))
        if self.scored and not self.truth:
            raise MetricError(f"a {self.usage} query has no ground-truth images")

    @property
    def scored(self) -> bool:
        """Whether the query counts in the metric (Public or Private, not Ignored)."""
        return self.usage in SCORED_USAGES


# ---------------------------------------------------------------------------------------------
# Per-query values
# ---------------------------------------------------------------------------------------------


def _check_k(k: int) -> None:
    """Reject a cut-off that is not a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _as_set(truth: Collection[str]) -> Collection[str]:
    """The ground truth as something with O(1) membership (a list would make scoring O(n·m))."""
    return truth if isinstance(truth, (set, frozenset)) else frozenset(truth)


def _hit_ranks(predictions: Sequence[str], truth: Collection[str], k: int) -> list[int]:
    """The 1-based ranks (<= k) of the hits: first occurrences of ground-truth ids."""
    if isinstance(predictions, str):
        # A bare string would be scored character by character.
        raise MetricError(f"predictions must be a sequence of ids, not the string {predictions!r}")
    truth = _as_set(truth)
    seen: set[str] = set()
    ranks: list[int] = []
    for rank, image_id in enumerate(predictions[:k], start=1):
        if image_id in seen:
            continue  # a repeat: no hit, no miss, but the rank is used up
        seen.add(image_id)
        if image_id in truth:
            ranks.append(rank)
    return ranks


def _ap_from_ranks(hit_ranks: Sequence[int], truth_size: int, k: int) -> float:
    """AP@k from the hit ranks: sum of hits(r)/r over hit ranks, over min(|G|, k)."""
    return math.fsum(hits / rank for hits, rank in enumerate(hit_ranks, start=1)) / min(
        truth_size, k
    )


def _require_truth(truth: Collection[str]) -> None:
    """Reject an empty ground truth, for which AP and recall are 0/0."""
    if len(truth) == 0:
        raise ValueError("the ground truth is empty: AP and recall are undefined")


def average_precision(predictions: Sequence[str], truth: Collection[str], k: int = 100) -> float:
    """AP@k = (1 / min(|G|, k)) · Σ_{hit ranks r <= k} hits(r) / r (repeats skipped, see module)."""
    _check_k(k)
    truth = _as_set(truth)
    _require_truth(truth)
    return _ap_from_ranks(_hit_ranks(predictions, truth, k), len(truth), k)


def precision_at(predictions: Sequence[str], truth: Collection[str], k: int) -> float:
    """precision@k = (distinct ground-truth ids among the first k predictions) / k."""
    _check_k(k)
    return len(_hit_ranks(predictions, truth, k)) / k


def recall_at(predictions: Sequence[str], truth: Collection[str], k: int) -> float:
    """recall@k = (distinct ground-truth ids among the first k predictions) / |G|."""
    _check_k(k)
    truth = _as_set(truth)
    _require_truth(truth)
    return len(_hit_ranks(predictions, truth, k)) / len(truth)


# ---------------------------------------------------------------------------------------------
# Whole-solution scores
# ---------------------------------------------------------------------------------------------


def _check_submission(solution: Mapping[str, Query], submission: Mapping[str, Any]) -> None:
    """Raise `MetricError` naming the submitted ids that the solution does not know."""
    unknown = [query_id for query_id in submission if query_id not in solution]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise MetricError(f"submission query id {unknown[0]!r} is not in the solution{more}")


def _scored_queries(
    solution: Mapping[str, Query], submission: Mapping[str, Sequence[str]]
) -> Iterator[tuple[str, Query, Sequence[str]]]:
    """(id, query, predictions) for each scored query; an absent query predicts nothing."""
    _check_submission(solution, submission)
    for query_id, query in solution.items():
        if query.scored:
            yield query_id, query, submission.get(query_id, ())


def per_query_ap(
    solution: Mapping[str, Query], submission: Mapping[str, Sequence[str]], k: int = 100
) -> dict[str, float]:
    """AP@k of every scored query, in solution order (0.0 for one absent from the submission)."""
    _check_k(k)
    return {
        query_id: _ap_from_ranks(_hit_ranks(predictions, query.truth, k), len(query.truth), k)
        for query_id, query, predictions in _scored_queries(solution, submission)
    }


def _mean(values: Sequence[float]) -> float:
    """The mean of `values` as a plain float, 0.0 when there are none."""
    return math.fsum(values) / len(values) if values else 0.0


def score(
    solution: Mapping[str, Query], submission: Mapping[str, Sequence[str]], k: int = 100
) -> dict[str, float | int]:
    """mAP@k (all, Public, Private), mean precision@{1,5,10,k}, mean recall@k and query counts.

    Every mean is over the scored queries of its group (absent ones count 0, Ignored ones are
    skipped even when submitted); an empty group has mean 0.0 and count 0. precision@c is only
    reported for c <= k. `answered` counts the scored queries present in the submission, even
    with an empty list. Keys are named after `k` ("map@100", ..., "recall@100" for k=100).
    """
    _check_k(k)
    cutoffs = sorted({c for c in (*PRECISION_CUTOFFS, k) if c <= k})
    ap_by_usage: dict[str, list[float]] = {usage: [] for usage in SCORED_USAGES}
    precisions: dict[int, list[float]] = {cutoff: [] for cutoff in cutoffs}
    recalls: list[float] = []
    answered = 0
    for query_id, query, predictions in _scored_queries(solution, submission):
        if query_id in submission:
            answered += 1
        ranks = _hit_ranks(predictions, query.truth, k)
        ap_by_usage[query.usage].append(_ap_from_ranks(ranks, len(query.truth), k))
        for cutoff in cutoffs:
            precisions[cutoff].append(sum(rank <= cutoff for rank in ranks) / cutoff)
        recalls.append(len(ranks) / len(query.truth))

    all_aps = ap_by_usage[PUBLIC] + ap_by_usage[PRIVATE]
    result: dict[str, float | int] = {
        f"map@{k}": _mean(all_aps),
        f"map@{k}_public": _mean(ap_by_usage[PUBLIC]),
        f"map@{k}_private": _mean(ap_by_usage[PRIVATE]),
    }
    result.update({f"precision@{c}": _mean(precisions[c]) for c in cutoffs})
    result[f"recall@{k}"] = _mean(recalls)
    result["queries"] = len(all_aps)
    result["queries_public"] = len(ap_by_usage[PUBLIC])
    result["queries_private"] = len(ap_by_usage[PRIVATE])
    result["answered"] = answered
    return result


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _read_rows(path: StrPath, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(row number, row) of a CSV file with the `required` columns; the header is row 1.

    Everything that would otherwise end in a traceback or be scored silently wrong (a missing
    file, text that is not UTF-8, a cell over the csv module's size limit, a row with more cells
    than the header has columns) is a `MetricError` naming the file and the row.
    """
    if not Path(path).is_file():
        raise MetricError(f"{path}: file not found")
    row_number = 0  # the last row read whole; the next one is the one that can fail
    try:
        # utf-8-sig: tolerate the byte-order mark that spreadsheet exports put before the header.
        with Path(path).open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames
            if header is None:
                raise MetricError(
                    f"{path}: row 1: the file is empty (expected a header {required})"
                )
            row_number = 1
            missing = [column for column in required if column not in header]
            if missing:
                raise MetricError(f"{path}: row 1: missing column(s) {missing} in header {header}")
            # Rows are counted as records, so a quoted cell spanning lines is still one row.
            for row_number, row in enumerate(reader, start=2):
                _check_width(path, row_number, row, header)
                yield row_number, row
    except UnicodeDecodeError:
        # The text layer decodes in blocks, so the row is unknown here: find the byte instead.
        raise MetricError(f"{path}: {_utf8_problem(path)}") from None
    except csv.Error as error:
        raise MetricError(f"{path}: row {row_number + 1}: {_csv_problem(error)}") from None


def _check_width(path: StrPath, row_number: int, row: dict[Any, Any], header: Sequence[str]
                 ) -> None:
    """Reject a row with more cells than the header has columns.

    DictReader keeps the extra cells under the key None; ignoring them would score
    "q,a,b,c" (ids separated by commas) as the single prediction "a".
    """
    extra = row.get(None)
    if extra:
        raise MetricError(
            f"{path}: row {row_number}: {len(header) + len(extra)} cells but the header has "
            f"{len(header)} columns {list(header)} (ids within a cell are separated by spaces, "
            "not commas)"
        )


def _csv_problem(error: csv.Error) -> str:
    """A readable reason for a csv module error; for the size limit, which limit and why."""
    if "field larger than field limit" in str(error):
        return (f"a cell is longer than {csv.field_size_limit()} characters, the csv module's "
                "field size limit (an unclosed quote can also swallow the rest of the file)")
    return f"not valid CSV: {error}"


def _utf8_problem(path: StrPath) -> str:
    """Where the file stops being UTF-8: 'line N (byte offset B): ...'."""
    offset = 0
    with Path(path).open("rb") as handle:
        # Splitting at b"\n" never cuts a UTF-8 sequence: its bytes are all >= 0x80.
        for line_number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                bad = line[error.start:error.end].hex(" ")
                return (f"line {line_number} (byte offset {offset + error.start}): "
                        f"not UTF-8 text (byte(s) {bad})")
            offset += len(line)
    return "not UTF-8 text"  # unreachable unless the file changed while being read


def _split_ids(cell: str | None) -> list[str]:
    """The space-separated ids of an images cell (a short row's missing cell has none)."""
    return (cell or "").split()


def _query_id(path: StrPath, row_number: int, row: dict[str, str], seen: Collection[str]) -> str:
    """The row's id, checked to be non-empty and not seen before in the file."""
    query_id = (row.get("id") or "").strip()
    if not query_id:
        raise MetricError(f"{path}: row {row_number}: empty id")
    if query_id in seen:
        raise MetricError(f"{path}: row {row_number}: duplicate id {query_id!r}")
    return query_id


def read_solution_csv(path: StrPath) -> dict[str, Query]:
    """Read a GLDv2 retrieval solution (`id,images,Usage`) into {query id: Query}, file order."""
    solution: dict[str, Query] = {}
    for row_number, row in _read_rows(path, ("id", "images", "Usage")):
        query_id = _query_id(path, row_number, row, solution)
        usage = (row.get("Usage") or "").strip()
        images = _split_ids(row.get("images"))
        if usage == IGNORED or images == [NO_IMAGES]:
            # Ignored rows carry "None" (or nothing) and are never scored; a scored row with
            # "None" has no ground truth, which `Query` rejects.
            images = []
        try:
            solution[query_id] = Query(usage, frozenset(images))
        except MetricError as error:
            raise MetricError(f"{path}: row {row_number}: query {query_id!r}: {error}") from None
    # With no scored query every mean would be 0/0, reported as 0.0: refuse rather than
    # report a score that means nothing.
    if not solution:
        raise MetricError(f"{path}: no query rows after the header: nothing to score")
    if not any(query.scored for query in solution.values()):
        raise MetricError(f"{path}: no {PUBLIC} or {PRIVATE} query (only {len(solution)} "
                          f"{IGNORED} row(s)): nothing to score")
    return solution


def read_submission_csv(path: StrPath) -> dict[str, list[str]]:
    """Read a Kaggle submission (`id,images`) into {query id: predicted ids}, file order."""
    submission: dict[str, list[str]] = {}
    for row_number, row in _read_rows(path, ("id", "images")):
        query_id = _query_id(path, row_number, row, submission)
        submission[query_id] = _split_ids(row.get("images"))
    return submission


def write_submission_csv(path: StrPath, submission: Mapping[str, Sequence[str]]) -> None:
    """Write a Kaggle submission (`id,images`, ids space-separated), queries in the given order."""
    rows = []
    for query_id, predictions in submission.items():
        if isinstance(predictions, str):
            raise MetricError(f"query {query_id!r}: predictions must be a sequence of ids")
        for image_id in predictions:
            # An id with whitespace (or an empty one) would not survive the space-separated cell.
            if not image_id or image_id.split() != [image_id]:
                raise MetricError(f"query {query_id!r}: image id {image_id!r} is not writable")
        rows.append((query_id, " ".join(predictions)))
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("id", "images"))
        writer.writerows(rows)


def evaluate_files(
    solution_csv: StrPath, submission_csv: StrPath, k: int = 100
) -> dict[str, float | int]:
    """Read a solution and a submission file and `score` them."""
    return score(read_solution_csv(solution_csv), read_submission_csv(submission_csv), k)
