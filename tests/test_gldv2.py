"""GLDv2 readers: id parsing, layout, quoting, and clear errors on malformed files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import URL, hexid, write_csv
from glr import gldv2
from glr.gldv2 import GLDv2FormatError


def test_hex_ids_round_trip():
    ids = ["0123456789abcdef", "ffffffffffffffff", "00000000000000a0", "FEDCBA9876543210"]
    values = gldv2.hex_to_uint64(ids)
    assert values.dtype == np.uint64
    assert values.tolist() == [0x0123456789ABCDEF, 2**64 - 1, 0xA0, 0xFEDCBA9876543210]
    assert gldv2.uint64_to_hex(values).to_pylist() == [i.lower() for i in ids]


def test_hex_ids_on_sliced_and_chunked_arrays():
    arr = pa.array(["0000000000000001", "0000000000000002", "0000000000000003"])
    assert gldv2.hex_to_uint64(arr.slice(1)).tolist() == [2, 3]
    assert gldv2.hex_to_uint64(pa.chunked_array([arr.slice(2), arr])).tolist() == [3, 1, 2, 3]


@pytest.mark.parametrize(("ids", "message"), [
    (["0000000000000001", "123"], r"ids\.csv: image id '123' at data row 2 is not 16 hex"),
    (["000000000000000g"], r"image id '000000000000000g' at data row 1 is not hexadecimal"),
])
def test_bad_ids(ids, message):
    with pytest.raises(GLDv2FormatError, match=message):
        gldv2.hex_to_uint64(ids, "ids.csv")


def test_image_path_layout(tmp_path):
    layout = gldv2.Layout(tmp_path)
    assert layout.image_path("index", "abcdef0123456789") == (
        tmp_path / "index" / "a" / "b" / "c" / "abcdef0123456789.jpg")


def test_categories_lose_their_url_and_keep_commas(tmp_path):
    path = tmp_path / "cats.csv"
    write_csv(path, ["landmark_id", "category"], [(1, URL + "A,_B"), (2, URL + "C")])
    assert '"' in path.read_text()  # the comma forced quoting, as in GLDv2
    frame = gldv2.read_label_to_category(path)
    assert frame["category"].tolist() == ["A,_B", "C"]


def test_namibia_is_not_missing(tmp_path):
    path = tmp_path / "continents.csv"
    write_csv(path, ["Continent_Name", "Two_Letter_Country_Code"], [("Africa", "NA")])
    continents = gldv2.read_continents(path)
    assert continents["NA"] == "Africa"
    assert continents["XK"] == "Europe" and continents["OTHER"] == "OTHER"


def test_shipped_continent_table_is_complete():
    continents = gldv2.read_continents(gldv2.SHIPPED_CONTINENTS)
    assert len(continents) == 251  # 249 ISO codes + XK + OTHER
    assert continents["TM"] == "Asia"
    assert continents["JP"] == "Asia" and continents["BR"] == "South America"
    assert continents["RU"] == "Europe" and continents["AQ"] == "Antarctica"


AUTHORS_CONTINENTS = gldv2.SHIPPED_CONTINENTS.with_name("continent_codes_authors.csv")
# The authors read the public country-and-continent-codes-list CSV into a dict, so for the 8
# countries it lists twice the last row wins (Asia; North America for UM) where the shipped
# table has the first (the shipped table took TM, Turkmenistan, from that list too).
SHIPPED_TRANSCONTINENTAL = {"RU": "Europe", "TR": "Europe", "KZ": "Europe", "AZ": "Europe",
                            "AM": "Europe", "GE": "Europe", "CY": "Europe", "UM": "Oceania"}
AUTHORS_TRANSCONTINENTAL = {"RU": "Asia", "TR": "Asia", "KZ": "Asia", "AZ": "Asia",
                            "AM": "Asia", "GE": "Asia", "CY": "Asia", "UM": "North America"}
AUTHORS_ONLY = {"TM": "Asia"}


def test_authors_continent_table_differs_only_at_the_doubly_listed_countries():
    shipped = gldv2.read_continents(gldv2.SHIPPED_CONTINENTS)
    authors = gldv2.read_continents(AUTHORS_CONTINENTS)
    assert {code: shipped[code] for code in SHIPPED_TRANSCONTINENTAL} == SHIPPED_TRANSCONTINENTAL
    assert shipped.keys() <= authors.keys()  # complete: every code of the shipped table
    differ = {code for code in shipped.keys() | authors.keys()
              if shipped.get(code) != authors.get(code)}
    assert differ == AUTHORS_TRANSCONTINENTAL.keys() | (AUTHORS_ONLY.keys() - shipped.keys())
    assert authors == {**shipped, **AUTHORS_TRANSCONTINENTAL, **AUTHORS_ONLY}


def test_authors_continent_table_has_one_row_per_code():
    """Same format as the shipped table; no code twice (the reader would keep the last)."""
    lines = AUTHORS_CONTINENTS.read_text().splitlines()
    assert lines[0] == gldv2.SHIPPED_CONTINENTS.read_text().splitlines()[0]
    codes = [line.split(",")[1] for line in lines[1:]]
    assert len(codes) == len(set(codes)) == 249  # the shipped table's 249 ISO codes
    continents = {line.split(",")[0] for line in lines[1:]}
    assert continents == set(gldv2.read_continents(gldv2.SHIPPED_CONTINENTS).values()) - {"OTHER"}


def test_duplicate_train_id(tmp_path):
    path = tmp_path / "train.csv"
    write_csv(path, ["id", "url", "landmark_id"],
              [(hexid("1"), "u", 1), (hexid("2"), "u", 1), (hexid("1"), "u", 2)])
    with pytest.raises(GLDv2FormatError, match=r"train\.csv: duplicate id '0+1' at data row 3"):
        gldv2.read_train(path)


def test_missing_file(tmp_path):
    with pytest.raises(GLDv2FormatError, match=r"train\.csv: file not found"):
        gldv2.read_train(tmp_path / "train.csv")


def test_solution_usage_and_ignored_rows(tmp_path):
    path = tmp_path / "solution.csv"
    write_csv(path, ["id", "images", "Usage"],
              [(hexid("1"), f"{hexid('a')} {hexid('b')}", "Public"), (hexid("2"), "None",
                                                                     "Ignored")])
    frame = gldv2.read_solution(path)
    assert frame["usage"].tolist() == ["Public", "Ignored"]
    assert [v.tolist() for v in frame["images"]] == [[0xA, 0xB], []]
    write_csv(path, ["id", "images", "Usage"], [(hexid("1"), hexid("a"), "Secret")])
    with pytest.raises(GLDv2FormatError, match=r"Usage 'Secret' at data row 1 is not one of"):
        gldv2.read_solution(path)


def test_malformed_country_file(tmp_path):
    layout = gldv2.Layout(tmp_path)
    layout.country_dir.mkdir(parents=True)
    layout.country_codes_json.write_text('["JP"]')
    (layout.country_dir / "JP.json").write_text('[{"title": "x"}]')
    with pytest.raises(GLDv2FormatError, match=r"JP\.json: entry 0 has no string field 'name'"):
        gldv2.read_country_categories(layout)
    (layout.country_dir / "JP.json").unlink()
    with pytest.raises(GLDv2FormatError, match=r"JP\.json: file not found"):
        gldv2.read_country_categories(layout)


@pytest.mark.parametrize(("reader", "header", "expected"), [
    (gldv2.read_train, ["id", "url", "landmark_id"], "one row per train image"),
    (gldv2.read_train_clean, ["landmark_id", "images"], "one row per clean landmark"),
    (gldv2.read_solution, ["id", "images", "Usage"], "one row per test image"),
])
def test_header_only_file_is_an_error_naming_it(tmp_path, reader, header, expected):
    path = tmp_path / "header_only.csv"
    write_csv(path, header, [])
    with pytest.raises(GLDv2FormatError, match=rf"header_only\.csv: no data rows after the "
                                               rf"header \(expected {expected}\)"):
        reader(path)


def test_solution_with_only_ignored_rows_is_an_error(tmp_path):
    path = tmp_path / "solution.csv"
    write_csv(path, ["id", "images", "Usage"], [(hexid("1"), "None", "Ignored"),
                                                (hexid("2"), "None", "Ignored")])
    with pytest.raises(GLDv2FormatError, match=r"solution\.csv: no Public or Private query "
                                               r"\(only 2 Ignored row\(s\)\)"):
        gldv2.read_solution(path)
