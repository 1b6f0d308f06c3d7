"""The GLDv2 file layout and its readers.

Every reader validates what it reads and raises `GLDv2FormatError` naming the file, the column
and (where it can) the row. Image ids are 16 hex characters; they are held as `uint64` inside
the project (8 bytes instead of a Python string per id, and fast joins over 4.9M rows) and
written back as hex strings in every artifact.

Layout under a GLDv2 root (the real one and `glr synth`'s mini one alike):

    train/train.csv                         id,url,landmark_id
    train/train_clean.csv                   landmark_id,images (space-separated ids)
    train/train_label_to_category.csv       landmark_id,category (Wikimedia Commons URL)
    train/country_codes.json                ["AD", ..., "OTHER"]
    train/country/<CC>.json                 [{"name": <category name>, ...}, ...]
    index/index_image_to_landmark.csv       id,landmark_id
    index/index_label_to_category.csv       landmark_id,category
    test/retrieval_solution_v2.1.csv        id,images,Usage
    continent_codes.csv                     Continent_Name,Two_Letter_Country_Code (written by
                                            `glr synth`; for the real GLDv2 use the full table
                                            shipped in glr/resources, see SHIPPED_CONTINENTS)
    <split>/<a>/<b>/<c>/<id>.jpg            a, b, c = the id's first three characters
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from glr.errors import GLDv2FormatError

SPLITS = ("train", "index", "test")
USAGES = ("Public", "Private", "Ignored")
CATEGORY_PREFIXES = (
    "http://commons.wikimedia.org/wiki/Category:",
    "https://commons.wikimedia.org/wiki/Category:",
)
# Countries the continent table does not carry; rules of method.md.
SPECIAL_CONTINENTS = {"XK": "Europe", "OTHER": "OTHER"}
SHIPPED_CONTINENTS = Path(__file__).parent / "resources" / "continent_codes.csv"
NO_COUNTRY = "NONE"  # country and continent of label -1 (non-landmark test images)
ID_LENGTH = 16


@dataclass(frozen=True)
class Layout:
    """Paths of the GLDv2 metadata files under one root."""

    root: Path

    @property
    def train_csv(self) -> Path:
        return self.root / "train" / "train.csv"

    @property
    def train_clean_csv(self) -> Path:
        return self.root / "train" / "train_clean.csv"

    @property
    def train_categories_csv(self) -> Path:
        return self.root / "train" / "train_label_to_category.csv"

    @property
    def country_codes_json(self) -> Path:
        return self.root / "train" / "country_codes.json"

    @property
    def country_dir(self) -> Path:
        return self.root / "train" / "country"

    @property
    def index_csv(self) -> Path:
        return self.root / "index" / "index_image_to_landmark.csv"

    @property
    def index_categories_csv(self) -> Path:
        return self.root / "index" / "index_label_to_category.csv"

    @property
    def solution_csv(self) -> Path:
        return self.root / "test" / "retrieval_solution_v2.1.csv"

    @property
    def continent_csv(self) -> Path:
        """Where `glr synth` writes its table; the real GLDv2 has none (see SHIPPED_CONTINENTS)."""
        return self.root / "continent_codes.csv"

    def metadata_files(self) -> list[Path]:
        """The files `prepare` reads (the country files are listed by country_codes.json)."""
        return [self.train_csv, self.train_clean_csv, self.train_categories_csv,
                self.country_codes_json, self.index_csv, self.index_categories_csv,
                self.solution_csv]

    def image_path(self, split: str, image_id: str) -> Path:
        return self.root / image_relpath(split, image_id)


def image_relpath(split: str, image_id: str) -> str:
    """`<split>/<a>/<b>/<c>/<id>.jpg`, the GLDv2 image location relative to the root."""
    return f"{split}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


# --------------------------------------------------------------------------- ids

_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i
_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex_to_uint64(ids: pa.Array | pa.ChunkedArray | list[str] | np.ndarray,
                  source: str = "ids") -> np.ndarray:
    """Parse 16-hex-char ids into uint64, vectorized; `source` names the file for errors."""
    if isinstance(ids, (list, np.ndarray)):
        ids = pa.array(ids, type=pa.string())
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], type=pa.string())
    if len(ids) == 0:
        return np.zeros(0, dtype=np.uint64)
    if ids.null_count:
        row = int(np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False))[0])
        raise GLDv2FormatError(f"{source}: empty image id at data row {row + 1}")
    lengths = pc.binary_length(ids).to_numpy()
    bad = np.flatnonzero(lengths != ID_LENGTH)
    if bad.size:
        row = int(bad[0])
        raise GLDv2FormatError(f"{source}: image id {ids[row].as_py()!r} at data row {row + 1} "
                               f"is not {ID_LENGTH} hex characters")
    # All ids have the same length, so the character buffer is an (n, 16) matrix.
    offset_type = np.int64 if ids.type == pa.large_string() else np.int32
    first = int(np.frombuffer(ids.buffers()[1], dtype=offset_type)[ids.offset])
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)
    chars = data[first: first + len(ids) * ID_LENGTH].reshape(len(ids), ID_LENGTH)
    nibbles = _HEX_VALUE[chars]
    bad_rows = np.flatnonzero((nibbles == 255).any(axis=1))
    if bad_rows.size:
        row = int(bad_rows[0])
        raise GLDv2FormatError(f"{source}: image id {ids[row].as_py()!r} at data row {row + 1} "
                               "is not hexadecimal")
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # (n, 8) bytes, most significant first
    return np.ascontiguousarray(packed).view(">u8").reshape(-1).astype(np.uint64)


def uint64_to_hex(values: np.ndarray) -> pa.Array:
    """Format uint64 ids as 16-char lowercase hex strings (a pyarrow string array)."""
    packed = np.ascontiguousarray(values, dtype=">u8").view(np.uint8).reshape(-1, 8)
    chars = np.empty((len(packed), ID_LENGTH), dtype=np.uint8)
    chars[:, 0::2] = _HEX_CHARS[packed >> 4]
    chars[:, 1::2] = _HEX_CHARS[packed & 15]
    chars = chars.reshape(-1)
    offsets = np.arange(0, (len(values) + 1) * ID_LENGTH, ID_LENGTH, dtype=np.int32)
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets),
                                       pa.py_buffer(chars.tobytes()))


# --------------------------------------------------------------------------- CSV reading


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise GLDv2FormatError(f"{path}: file not found")


def read_csv(path: Path, column_types: dict[str, pa.DataType]) -> pa.Table:
    """Read the named columns of a CSV with pyarrow; missing columns and bad values are errors.

    No value is read as null ("NA" is Namibia, "None" a word): every cell is taken as written.
    """
    _require_file(path)
    try:
        with path.open("rb") as handle:
            header = handle.readline().decode("utf-8-sig").strip().split(",")
    except UnicodeDecodeError:
        raise GLDv2FormatError(f"{path}: header is not UTF-8 text") from None
    header = [name.strip().strip('"') for name in header]
    missing = [name for name in column_types if name not in header]
    if missing:
        raise GLDv2FormatError(f"{path}: missing column(s) {', '.join(missing)}; "
                               f"header has {', '.join(header)}")
    convert = pacsv.ConvertOptions(column_types=column_types, include_columns=list(column_types),
                                   strings_can_be_null=False, null_values=[],
                                   quoted_strings_can_be_null=False)
    try:
        return pacsv.read_csv(path, convert_options=convert,
                              read_options=pacsv.ReadOptions(block_size=64 << 20))
    except pa.ArrowInvalid as err:
        raise GLDv2FormatError(f"{path}: {_arrow_message(err)}") from None


def _arrow_message(err: Exception) -> str:
    message = str(err).strip()
    if "conversion error to int64" in message:
        message += " (expected an integer)"
    return message


def _require_rows(table: pa.Table, path: Path, what: str) -> None:
    """Reject a file with a header and no data rows: every list built from it would be empty."""
    if table.num_rows == 0:
        raise GLDv2FormatError(f"{path}: no data rows after the header (expected {what})")


def _ints(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy()


def read_train(path: Path) -> pd.DataFrame:
    """train.csv → DataFrame(id: uint64, landmark_id: int64), file order; ids must be unique."""
    table = read_csv(path, {"id": pa.string(), "landmark_id": pa.int64()})
    _require_rows(table, path, "one row per train image")
    frame = pd.DataFrame({"id": hex_to_uint64(table.column("id"), str(path)),
                          "landmark_id": _ints(table, "landmark_id")})
    _reject_duplicates(frame["id"], path)
    return frame


def read_train_clean(path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """train_clean.csv → (landmark_id per row, DataFrame(row, id) of every listed image).

    `row` is the 0-based row number: the global label of the clean list.
    """
    table = read_csv(path, {"landmark_id": pa.int64(), "images": pa.string()})
    _require_rows(table, path, "one row per clean landmark")
    landmark_ids = _ints(table, "landmark_id")
    _reject_duplicates(pd.Series(landmark_ids), path, what="landmark_id")
    images = pc.split_pattern(pc.utf8_trim_whitespace(table.column("images")), " ")
    counts = pc.list_value_length(images).to_numpy(zero_copy_only=False)
    ids = hex_to_uint64(pc.list_flatten(images), f"{path} (column images)")
    rows = np.repeat(np.arange(len(landmark_ids), dtype=np.int64), counts)
    return landmark_ids, pd.DataFrame({"row": rows, "id": ids})


def category_name(categories: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strip the Wikimedia Commons URL prefix: the category name as the country files list it."""
    for prefix in CATEGORY_PREFIXES:
        categories = pc.replace_substring_regex(categories, "^" + prefix.replace(".", r"\."), "")
    return categories


def read_label_to_category(path: Path) -> pd.DataFrame:
    """*_label_to_category.csv → DataFrame(landmark_id, category) with the URL prefix removed."""
    table = read_csv(path, {"landmark_id": pa.int64(), "category": pa.string()})
    frame = pd.DataFrame({
        "landmark_id": _ints(table, "landmark_id"),
        "category": category_name(table.column("category")).to_pandas(),
    })
    _reject_duplicates(frame["landmark_id"], path, what="landmark_id")
    return frame


def read_index(path: Path) -> pd.DataFrame:
    """index_image_to_landmark.csv → DataFrame(id: uint64, landmark_id: int64)."""
    table = read_csv(path, {"id": pa.string(), "landmark_id": pa.int64()})
    frame = pd.DataFrame({"id": hex_to_uint64(table.column("id"), str(path)),
                          "landmark_id": _ints(table, "landmark_id")})
    _reject_duplicates(frame["id"], path)
    return frame


def read_solution(path: Path) -> pd.DataFrame:
    """retrieval_solution_v2.1.csv → DataFrame(id, usage, images: list of uint64 index ids).

    Ignored rows carry no ground truth (their `images` cell, often "None", is not read).
    """
    table = read_csv(path, {"id": pa.string(), "images": pa.string(), "Usage": pa.string()})
    _require_rows(table, path, "one row per test image")
    ids = hex_to_uint64(table.column("id"), str(path))
    usage = table.column("Usage").to_numpy(zero_copy_only=False).astype(str)
    bad = np.flatnonzero(~np.isin(usage, USAGES))
    if bad.size:
        row = int(bad[0])
        raise GLDv2FormatError(f"{path}: Usage {str(usage[row])!r} at data row {row + 1} is "
                               f"not one of {', '.join(USAGES)}")
    scored = usage != "Ignored"
    if not scored.any():
        # No validation query: nothing for `evaluate` to score, nothing to hold out.
        raise GLDv2FormatError(f"{path}: no Public or Private query (only {len(usage)} Ignored "
                               "row(s)): nothing to evaluate on")
    cells = table.column("images").to_numpy(zero_copy_only=False)
    images: list[np.ndarray] = [np.zeros(0, dtype=np.uint64)] * len(ids)
    # Non-Ignored rows are few (1,129 in GLDv2), so a loop over them is cheap.
    for row in np.flatnonzero(scored):
        listed = cells[row].split()
        if not listed:
            raise GLDv2FormatError(f"{path}: {usage[row]} query at data row {row + 1} has no "
                                   "ground-truth images")
        images[row] = hex_to_uint64(listed, f"{path} (column images, data row {row + 1})")
    frame = pd.DataFrame({"id": ids, "usage": usage, "images": images})
    _reject_duplicates(frame["id"], path)
    return frame


def _reject_duplicates(values: pd.Series, path: Path, what: str = "id") -> None:
    dup = values.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        value = values.iloc[row]
        if what == "id" and isinstance(value, (np.integer, int)):
            value = uint64_to_hex(np.array([value]))[0].as_py()
        raise GLDv2FormatError(f"{path}: duplicate {what} {value!r} at data row {row + 1}")


# --------------------------------------------------------------------------- countries


def read_country_categories(layout: Layout) -> pd.DataFrame:
    """Country files → DataFrame(category, country): which country each category lies in.

    A category listed by two countries keeps the last one in country_codes.json order (as the
    authors' dict did).
    """
    path = layout.country_codes_json
    _require_file(path)
    try:
        codes = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GLDv2FormatError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        raise GLDv2FormatError(f"{path}: expected a JSON list of country codes")
    categories: list[str] = []
    countries: list[str] = []
    for code in codes:
        country_path = layout.country_dir / f"{code}.json"
        _require_file(country_path)
        try:
            entries = json.loads(country_path.read_text())
        except json.JSONDecodeError as err:
            raise GLDv2FormatError(f"{country_path}: not valid JSON: {err}") from None
        if not isinstance(entries, list):
            raise GLDv2FormatError(f"{country_path}: expected a JSON list of objects")
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise GLDv2FormatError(f"{country_path}: entry {position} has no string "
                                       "field 'name'")
            categories.append(entry["name"])
        countries.extend([code] * len(entries))
    frame = pd.DataFrame({"category": categories, "country": countries})
    return frame.drop_duplicates("category", keep="last").reset_index(drop=True)


def read_continents(path: Path) -> dict[str, str]:
    """continent_codes.csv → {2-letter code: continent}, plus XK → Europe and OTHER → OTHER."""
    table = read_csv(path, {"Continent_Name": pa.string(), "Two_Letter_Country_Code": pa.string()})
    continents = dict(zip(table.column("Two_Letter_Country_Code").to_pylist(),
                          table.column("Continent_Name").to_pylist(), strict=True))
    continents.update(SPECIAL_CONTINENTS)
    return continents
