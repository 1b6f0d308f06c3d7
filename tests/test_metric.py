"""The GLDv2 retrieval metric against hand-computed values, and its CSV files."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from glr.metric import (
    MetricError,
    Query,
    average_precision,
    evaluate_files,
    per_query_ap,
    precision_at,
    read_solution_csv,
    read_submission_csv,
    recall_at,
    score,
    write_submission_csv,
)

# ---------------------------------------------------------------------------------------------
# average_precision
# ---------------------------------------------------------------------------------------------


def test_perfect_list_in_any_order_has_ap_one():
    assert average_precision(["a", "b", "c"], {"a", "b", "c"}) == 1.0
    assert average_precision(["c", "a", "b"], {"a", "b", "c"}) == 1.0


def test_hits_at_ranks_one_and_three():
    # rank 1: hit, P = 1/1; rank 2: miss; rank 3: hit, P = 2/3; |G| = 2
    assert average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx((1 + 2 / 3) / 2)


def test_a_repeated_prediction_is_skipped_but_uses_its_rank():
    # rank 1: hit (1/1); rank 2: repeat of a, neither hit nor miss; rank 3: hit (2/3)
    assert average_precision(["a", "a", "b"], {"a", "b"}) == pytest.approx((1 + 2 / 3) / 2)
    # a repeated miss also pushes the hit down: hit at rank 3, P = 1/3
    assert average_precision(["x", "x", "a"], {"a"}) == pytest.approx(1 / 3)
    # a repeated hit is not a second hit: 1 hit of |G| = 2
    assert average_precision(["a", "a"], {"a", "b"}) == pytest.approx(1 / 2)


def test_fewer_than_100_ground_truth_images_divide_by_their_count():
    # one hit at rank 1 of |G| = 3 → (1/1) / 3
    assert average_precision(["a", "x", "y"], {"a", "b", "c"}) == pytest.approx(1 / 3)


def test_more_than_100_ground_truth_images_divide_by_100():
    truth = {f"g{i}" for i in range(150)}
    assert average_precision([f"g{i}" for i in range(100)], truth) == 1.0
    # 50 hits at ranks 1..50, each with P = 1 → 50 / min(150, 100)
    assert average_precision([f"g{i}" for i in range(50)], truth) == pytest.approx(0.5)


def test_predictions_beyond_100_are_not_considered():
    misses = [f"x{i}" for i in range(100)]
    assert average_precision([*misses, "a"], {"a"}) == 0.0
    # the same hit at rank 100: P = 1/100
    assert average_precision([*misses[:99], "a", "b"], {"a", "b"}) == pytest.approx(0.01 / 2)


def test_the_cutoff_k_truncates_and_caps_the_denominator():
    assert average_precision(["x", "a"], {"a"}, k=1) == 0.0
    # |G| = 3 but k = 2: hits at 1 and 2 → (1 + 1) / min(3, 2)
    assert average_precision(["a", "b"], {"a", "b", "c"}, k=2) == 1.0


def test_empty_predictions_score_zero_and_list_truth_is_accepted():
    assert average_precision([], {"a"}) == 0.0
    assert average_precision(["a"], ["a", "b"]) == pytest.approx(1 / 2)


def test_empty_truth_bad_k_and_string_predictions_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        average_precision(["a"], set())
    with pytest.raises(ValueError, match="empty"):
        recall_at(["a"], set(), 5)
    with pytest.raises(ValueError, match="positive"):
        average_precision(["a"], {"a"}, k=0)
    with pytest.raises(MetricError, match="string"):
        average_precision("ab", {"a"})


def _official_ap(prediction: list[str], truth: set[str], max_predictions: int = 100) -> float:
    """DELF's `MeanAveragePrecision` inner loop for one query, written out as it is there."""
    ap = 0.0
    already_predicted: set[str] = set()
    num_correct = 0
    for i in range(min(len(prediction), max_predictions)):
        if prediction[i] not in already_predicted:
            if prediction[i] in truth:
                num_correct += 1
                ap += num_correct / (i + 1)
            already_predicted.add(prediction[i])
    return ap / min(len(truth), max_predictions)


def test_agrees_with_the_official_loop_on_random_lists_with_repeats():
    rng = random.Random(0)
    pool = [f"i{n}" for n in range(40)]
    for _ in range(300):
        truth = set(rng.sample(pool, rng.randint(1, 30)))
        # draws with replacement: repeats; up to 130 long: past the cutoff
        prediction = [rng.choice(pool) for _ in range(rng.randint(0, 130))]
        for k in (1, 7, 100):
            assert average_precision(prediction, truth, k) == pytest.approx(
                _official_ap(prediction, truth, k)
            )


# ---------------------------------------------------------------------------------------------
# precision_at / recall_at
# ---------------------------------------------------------------------------------------------


def test_precision_and_recall_on_a_hand_example():
    truth = {"a", "b", "c", "d"}
    # hits at ranks 1, 4, 6; rank 3 repeats a
    prediction = ["a", "x", "a", "b", "y", "c"]
    assert precision_at(prediction, truth, 1) == 1.0
    assert precision_at(prediction, truth, 3) == pytest.approx(1 / 3)
    assert precision_at(prediction, truth, 5) == pytest.approx(2 / 5)
    # divided by k even though only 6 predictions were made
    assert precision_at(prediction, truth, 10) == pytest.approx(3 / 10)
    assert recall_at(prediction, truth, 5) == pytest.approx(2 / 4)
    assert recall_at(prediction, truth, 100) == pytest.approx(3 / 4)
    assert average_precision(prediction, truth) == pytest.approx((1 / 1 + 2 / 4 + 3 / 6) / 4)


# ---------------------------------------------------------------------------------------------
# score / per_query_ap
# ---------------------------------------------------------------------------------------------

SOLUTION = {
    "q1": Query("Public", frozenset({"a", "b"})),
    "q2": Query("Public", frozenset({"c"})),
    "q3": Query("Private", frozenset({"d", "e"})),
    "q4": Query("Ignored", frozenset()),
}
# q1: hits at 1 and 3 → AP 5/6; q2: absent → 0; q3: hit at 2 of |G| = 2 → (1/2)/2 = 1/4;
# q4: Ignored, submitted, not scored.
SUBMISSION = {"q1": ["a", "x", "b"], "q3": ["x", "d"], "q4": ["z"]}
EXPECTED = {
    "map@100": (5 / 6 + 0 + 1 / 4) / 3,  # 13/36
    "map@100_public": (5 / 6 + 0) / 2,
    "map@100_private": 1 / 4,
    "precision@1": (1 + 0 + 0) / 3,
    "precision@5": (2 / 5 + 0 + 1 / 5) / 3,
    "precision@10": (2 / 10 + 0 + 1 / 10) / 3,
    "precision@100": (2 / 100 + 0 + 1 / 100) / 3,
    "recall@100": (2 / 2 + 0 + 1 / 2) / 3,
    "queries": 3,
    "queries_public": 2,
    "queries_private": 1,
    "answered": 2,
}


def assert_scores(result: dict, expected: dict) -> None:
    """The same keys in the same order, counts exactly, fractions to float precision."""
    assert list(result) == list(expected)
    for key, value in expected.items():
        if isinstance(value, int):
            assert result[key] == value and type(result[key]) is int, key
        else:
            assert result[key] == pytest.approx(value), key
            assert type(result[key]) is float, key


def test_score_splits_public_and_private_and_averages_both():
    result = score(SOLUTION, SUBMISSION)
    assert_scores(result, EXPECTED)
    assert result["map@100"] == pytest.approx(13 / 36)
    json.dumps(result)  # plain Python numbers


def test_ignored_queries_are_not_scored_whether_submitted_or_not():
    without_ignored = {key: value for key, value in SUBMISSION.items() if key != "q4"}
    assert score(SOLUTION, without_ignored) == score(SOLUTION, SUBMISSION)


def test_a_submitted_id_unknown_to_the_solution_is_an_error_naming_it():
    with pytest.raises(MetricError, match="q9"):
        score(SOLUTION, {**SUBMISSION, "q9": ["a"]})
    with pytest.raises(MetricError, match="q9"):
        per_query_ap(SOLUTION, {"q9": ["a"]})


def test_an_empty_submission_scores_zero_and_an_empty_group_is_zero_with_count_zero():
    result = score(SOLUTION, {})
    assert result["map@100"] == 0.0 and result["recall@100"] == 0.0
    assert result["queries"] == 3 and result["answered"] == 0
    public_only = {"q1": SOLUTION["q1"], "q4": SOLUTION["q4"]}
    result = score(public_only, {"q1": ["a", "b"]})
    assert result["map@100"] == result["map@100_public"] == 1.0
    assert result["map@100_private"] == 0.0 and result["queries_private"] == 0


def test_an_empty_prediction_list_counts_as_answered():
    result = score(SOLUTION, {"q2": []})
    assert result["answered"] == 1 and result["map@100"] == 0.0


def test_score_keys_follow_k():
    # k = 2: q1's hit at rank 3 is cut → AP (1/1)/2; q3: (1/2)/2
    result = score(SOLUTION, SUBMISSION, k=2)
    assert list(result) == [
        "map@2",
        "map@2_public",
        "map@2_private",
        "precision@1",
        "precision@2",
        "recall@2",
        "queries",
        "queries_public",
        "queries_private",
        "answered",
    ]
    assert result["map@2"] == pytest.approx((1 / 2 + 0 + 1 / 4) / 3)
    assert result["precision@2"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    assert result["recall@2"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)


def test_per_query_ap_lists_scored_queries_in_solution_order():
    result = per_query_ap(SOLUTION, SUBMISSION)
    assert list(result) == ["q1", "q2", "q3"]
    assert result["q1"] == pytest.approx(5 / 6)
    assert result["q2"] == 0.0
    assert result["q3"] == pytest.approx(1 / 4)


def test_query_checks_its_usage_and_ground_truth():
    with pytest.raises(MetricError, match="Usage"):
        Query("Secret", frozenset({"a"}))
    with pytest.raises(MetricError, match="no ground-truth"):
        Query("Public", frozenset())
    assert Query("Private", {"a"}).truth == frozenset({"a"})  # type: ignore[arg-type]
    assert not Query("Ignored").scored


def test_score_is_linear_in_the_number_of_queries():
    # the competition's size: 1,129 scored queries among 117,577 rows, 100 predictions each
    solution = {f"q{n}": Query("Ignored") for n in range(117_577)}
    submission = {}
    for n in range(1_129):
        solution[f"q{n}"] = Query("Public" if n % 2 else "Private", frozenset({f"g{n}"}))
        submission[f"q{n}"] = [f"g{n}", *(f"x{i}" for i in range(99))]
    result = score(solution, submission)
    assert result["queries"] == result["answered"] == 1_129
    assert result["map@100"] == 1.0 and result["precision@100"] == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------
# CSV files
# ---------------------------------------------------------------------------------------------

SOLUTION_CSV = """\
id,images,Usage
q1,"a b",Public
q2,c,Public
q3,"d e",Private
q4,None,Ignored
"""


def test_csv_round_trip_gives_the_hand_computed_scores(tmp_path: Path):
    solution_path = tmp_path / "retrieval_solution_v2.1.csv"
    solution_path.write_text(SOLUTION_CSV)
    assert read_solution_csv(solution_path) == SOLUTION

    submission_path = tmp_path / "submission.csv"
    write_submission_csv(submission_path, SUBMISSION)
    assert submission_path.read_text() == "id,images\nq1,a x b\nq3,x d\nq4,z\n"
    assert read_submission_csv(submission_path) == SUBMISSION

    assert_scores(evaluate_files(solution_path, submission_path), EXPECTED)
    assert_scores(evaluate_files(str(solution_path), str(submission_path)), EXPECTED)


def test_submission_with_an_empty_list_round_trips(tmp_path: Path):
    path = tmp_path / "submission.csv"
    write_submission_csv(path, {"q2": [], "q1": ["a"]})
    assert path.read_text() == "id,images\nq2,\nq1,a\n"
    assert list(read_submission_csv(path).items()) == [("q2", []), ("q1", ["a"])]


def test_an_ignored_row_with_an_empty_cell_is_read(tmp_path: Path):
    path = tmp_path / "solution.csv"
    path.write_text("id,images,Usage\nq1,a,Private\nq2,,Ignored\n")
    assert read_solution_csv(path) == {
        "q1": Query("Private", frozenset({"a"})),
        "q2": Query("Ignored", frozenset()),
    }


def test_an_image_id_with_whitespace_cannot_be_written(tmp_path: Path):
    with pytest.raises(MetricError, match="a b"):
        write_submission_csv(tmp_path / "submission.csv", {"q1": ["a b"]})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("id,images\nq1,a\n", r"row 1: missing column\(s\) \['Usage'\]"),
        ("id,images,Usage\nq1,a,Public\nq2,b,Secret\n", "row 3: .*Usage 'Secret'"),
        ("id,images,Usage\nq1,a,Public\nq2,b,Private\nq1,c,Private\n", "row 4: duplicate id 'q1'"),
        ("id,images,Usage\nq1,None,Public\n", "row 2: .*no ground-truth"),
        ("id,images,Usage\nq1,,Private\n", "row 2: .*no ground-truth"),
        ("", "row 1: the file is empty"),
    ],
)
def test_a_malformed_solution_names_file_row_and_problem(tmp_path: Path, text: str, problem: str):
    path = tmp_path / "bad_solution.csv"
    path.write_text(text)
    with pytest.raises(MetricError, match=f"bad_solution.csv: {problem}"):
        read_solution_csv(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("id,predictions\nq1,a\n", r"row 1: missing column\(s\) \['images'\]"),
        ("id,images\nq1,a\nq1,b\n", "row 3: duplicate id 'q1'"),
    ],
)
def test_a_malformed_submission_names_file_and_row(tmp_path: Path, text: str, problem: str):
    path = tmp_path / "bad_submission.csv"
    path.write_text(text)
    with pytest.raises(MetricError, match=f"bad_submission.csv: {problem}"):
        read_submission_csv(path)


# ---------------------------------------------------------------------------------------------
# Files that cannot be scored faithfully (issue 8, section 3)
# ---------------------------------------------------------------------------------------------

# q1: truth {a, c, e}; predictions a b c → hits at 1 and 3 → AP (1/1 + 2/3) / 3 = 5/9.
# Read as "q1,a,b,c" without the width check it would be the single prediction a: AP 1/3.
COMMA_SOLUTION = "id,images,Usage\nq1,a c e,Public\nq2,None,Ignored\n"


def test_ids_separated_by_commas_are_an_error_naming_file_and_row(tmp_path: Path):
    solution = tmp_path / "solution.csv"
    solution.write_text(COMMA_SOLUTION)
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("id,images\nq2,z\nq1,a b c\n")
    result = evaluate_files(solution, spaced)
    assert result["map@100"] == pytest.approx(5 / 9)
    assert result["map@100_public"] == pytest.approx(5 / 9)
    assert result["recall@100"] == pytest.approx(2 / 3)

    commas = tmp_path / "commas.csv"
    commas.write_text("id,images\nq2,z\nq1,a,b,c\n")
    with pytest.raises(MetricError, match=r"commas\.csv: row 3: 4 cells but the header has 2 "
                                          r"columns \['id', 'images'\] .*separated by spaces"):
        evaluate_files(solution, commas)


def test_a_solution_row_with_extra_cells_is_an_error_naming_file_and_row(tmp_path: Path):
    path = tmp_path / "solution.csv"
    path.write_text("id,images,Usage\nq1,a,Public\nq2,b,c,Private\n")
    with pytest.raises(MetricError, match=r"solution\.csv: row 3: 4 cells but the header has 3"):
        read_solution_csv(path)


@pytest.mark.parametrize(
    ("header", "reader"),
    [("id,images,Usage", read_solution_csv), ("id,images", read_submission_csv)],
)
def test_a_cell_over_the_csv_field_size_limit_names_file_and_row(
    tmp_path: Path, header: str, reader: Callable[[Path], object]
):
    limit = csv.field_size_limit()
    usage = ",Public" if "Usage" in header else ""
    path = tmp_path / "huge.csv"
    path.write_text(f"{header}\nq1,a{usage}\nq2,{'b' * (limit + 1)}{usage}\n")
    with pytest.raises(MetricError, match=rf"huge\.csv: row 3: a cell is longer than {limit} "
                                          "characters, the csv module's field size limit"):
        reader(path)


@pytest.mark.parametrize(
    ("header", "reader"),
    [("id,images,Usage", read_solution_csv), ("id,images", read_submission_csv)],
)
def test_a_non_utf8_file_names_file_line_and_byte_offset(
    tmp_path: Path, header: str, reader: Callable[[Path], object]
):
    usage = b",Public" if "Usage" in header else b""
    path = tmp_path / "latin1.csv"
    first = header.encode() + b"\nq1,a" + usage + b"\n"
    path.write_bytes(first + b"q2,b\xe9c" + usage + b"\n")
    offset = len(first) + len(b"q2,b")
    with pytest.raises(MetricError, match=rf"latin1\.csv: line 3 \(byte offset {offset}\): "
                                          r"not UTF-8 text \(byte\(s\) e9\)"):
        reader(path)
    # The same in the header, and after a byte-order mark (counted in the offset).
    path.write_bytes(b"\xef\xbb\xbfid,im\xffages\n")
    with pytest.raises(MetricError, match=r"latin1\.csv: line 1 \(byte offset 8\): "):
        reader(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("id,images,Usage\n", "no query rows after the header: nothing to score"),
        ("id,images,Usage\nq1,None,Ignored\nq2,,Ignored\n",
         r"no Public or Private query \(only 2 Ignored row\(s\)\): nothing to score"),
    ],
)
def test_a_solution_with_nothing_to_score_is_an_error_not_a_zero(
    tmp_path: Path, text: str, problem: str
):
    solution = tmp_path / "empty_solution.csv"
    solution.write_text(text)
    submission = tmp_path / "submission.csv"
    submission.write_text("id,images\n")
    with pytest.raises(MetricError, match=f"empty_solution.csv: {problem}"):
        evaluate_files(solution, submission)


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path):
    solution = tmp_path / "solution.csv"
    solution.write_text(COMMA_SOLUTION)
    with pytest.raises(MetricError, match=r"nowhere\.csv: file not found"):
        evaluate_files(solution, tmp_path / "nowhere.csv")
