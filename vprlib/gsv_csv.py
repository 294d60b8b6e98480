"""Reading GSV-Cities city CSVs fast, and spelling each row's image path.

`read_city` is what `gsv_cities.read_gsv_dataframes` runs once per city CSV (in a thread
pool: everything heavy here runs in Arrow's C++ without the GIL). Two readers:
- the fast one, Arrow's CSV reader with the known columns typed, for the plain files the
  dataset has. It gives up (returns None) on anything unusual: a bad or missing value, a
  missing or duplicated column, several city_ids, no rows, and whatever the two readers
  could read differently (see `_read_plain_csv`);
- the careful one, pandas, which accepts a bit more (2015.0 in an int column) and turns
  every problem into an error naming the file, column, value and row.
Both give the same table for a plain file (tests/test_gsv_cities.py checks it).

The path of a row, `Images/<city_id>/<city_id>_<place_id:07d>_<year:04d>_<month:02d>_
<northdeg:03d>_<lat>_<lon>_<panoid>.jpg`, is built column-wise with no Python string per
row: the zero-padded ints are copied into one fixed-width byte buffer from lookup tables of
their few distinct values, lat/lon use Arrow's float -> text cast (Python's shortest repr,
fixed up where the notations differ), and one Arrow join glues the fields.

pyarrow is optional: without it (a copy of vprlib in a project that lacks it) the careful
reader reads every file and the paths are spelled row by row in Python (`file_name`): the
same table, about 2x slower to read (tests/test_gsv_cities.py checks both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

try:  # optional, see the module docstring: the fast reader and path builder need it
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pa_csv
except ImportError:
    pa = None

COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")
INT_COLUMNS = ("place_id", "year", "month", "northdeg")
FLOAT_COLUMNS = ("lat", "lon")
TEXT_COLUMNS = ("city_id", "panoid")
PLACE_STRIDE = 10**5  # place = city index * PLACE_STRIDE + place_id, as the reference does
# Valid values per column (inclusive): what the file names can encode and the data can mean.
VALUE_RANGES = {
    "place_id": (0, PLACE_STRIDE - 1),
    "year": (0, 9999),
    "month": (1, 12),
    "northdeg": (0, math.inf),
    "lat": (-90.0, 90.0),
    "lon": (-180.0, 180.0),
}
INT_WIDTHS = {"place_id": 7, "year": 4, "month": 2, "northdeg": 3}  # as the file names pad them

HAVE_ARROW = pa is not None
if HAVE_ARROW:
    # pandas' own str dtype backed by Arrow (what pandas >= 3 uses for text with pyarrow)
    ARROW_STR = pd.StringDtype("pyarrow", na_value=np.nan)
    _TO_PANDAS = {pa.string(): ARROW_STR, pa.large_string(): ARROW_STR}.get


def file_name(
    city_id: str,
    place_id: int,
    year: int,
    month: int,
    northdeg: int,
    lat: float,
    lon: float,
    panoid: str,
    ext: str = ".jpg",
) -> str:
    """The dataset's spelling of an image file name from valid values (lat/lon as Python's
    shortest float repr): the one place the format is written out in Python."""
    return (
        f"{city_id}_{place_id:07d}_{year:04d}_{month:02d}_{northdeg:03d}_"
        f"{lat!r}_{lon!r}_{panoid}{ext}"
    )


def read_city(path: Path, city_order: Mapping[str, int]) -> pd.DataFrame:
    """One city CSV, checked, with `place` (city_order[city_id] * PLACE_STRIDE + place_id)
    and `path`."""
    table = _read_plain_csv(path) if HAVE_ARROW else None
    if table is None:  # an unusual file: pandas reads it, or raises an error naming the problem
        df = _read_city_csv(path)
        df["place"] = df["place_id"] + city_order[df["city_id"].iloc[0]] * PLACE_STRIDE
        if HAVE_ARROW:
            df["path"] = relative_paths(df).to_pandas(types_mapper=_TO_PANDAS)
        else:
            df["path"] = pd.Series(python_relative_paths(df), index=df.index, dtype="str")
        return df
    city_index = city_order[table["city_id"][0].as_py()]
    place = pc.add(table["place_id"], city_index * PLACE_STRIDE)
    table = table.append_column("place", place).append_column("path", relative_paths(table))
    return table.to_pandas(types_mapper=_TO_PANDAS, split_blocks=True)  # no block copies


# ---------------------------------------------------------------- the two readers


def _read_plain_csv(path: Path) -> pa.Table | None:
    """The fast reader: a checked Arrow table, or None when the careful reader must look.
    It declines whatever the two readers could read differently: cells that only pandas
    parses as ints (+5), -0.0 (pandas drops the sign), extra columns that are not plain
    int, float or text without empty cells. Int columns are parsed as floats and cast
    (exactly) to int64: that accepts 2015.0 as pandas does and refuses "0x10", which
    Arrow's int parser would read as 16."""
    data = path.read_bytes()
    try:
        table = pa_csv.read_csv(
            pa.BufferReader(data),
            # one block, one thread: the caller runs the cities in parallel
            read_options=pa_csv.ReadOptions(use_threads=False, block_size=len(data) + 1),
            convert_options=pa_csv.ConvertOptions(
                column_types=_READ_TYPES, null_values=[""], strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid:  # short or long rows, a value that is not of its column's type
        return None
    names = [n or f"Unnamed: {i}" for i, n in enumerate(table.column_names)]  # as pandas
    if table.num_rows == 0 or len(set(names)) < len(names) or not set(COLUMNS) <= set(names):
        return None
    table = table.rename_columns(names).combine_chunks()
    if any(table[c].null_count or table[c].type not in _PLAIN_TYPES for c in names):
        return None
    int_extras = [c for c in names if c not in COLUMNS and table[c].type == pa.int64()]
    if int_extras and _hex_number_cell(data, names):  # one scan of the file, at most
        return None
    for col in (*INT_COLUMNS, *FLOAT_COLUMNS):
        lo, hi = VALUE_RANGES[col]
        v = table[col].to_numpy()
        if not (v.min() >= lo and v.max() <= hi):  # NaN fails both
            return None
        if col in FLOAT_COLUMNS and (np.signbit(v) & (v == 0)).any():
            return None
    for col in INT_COLUMNS:
        if table[col].to_numpy().max() >= 2**53:  # beyond the floats' exact integers
            return None
        try:
            ints = pc.cast(table[col], pa.int64())  # safe: a fraction raises
        except pa.ArrowInvalid:
            return None
        table = table.set_column(names.index(col), col, ints)
    for col in TEXT_COLUMNS:
        if pc.any(pc.equal(table[col], "")).as_py():
            return None
    if pc.count_distinct(table["city_id"]).as_py() != 1:
        return None
    return table


if HAVE_ARROW:
    # What the fast reader asks Arrow for: int columns as floats (see _read_plain_csv).
    _READ_TYPES = {
        **dict.fromkeys(INT_COLUMNS, pa.float64()),
        **dict.fromkeys(FLOAT_COLUMNS, pa.float64()),
        **dict.fromkeys(TEXT_COLUMNS, pa.string()),
    }
    _PLAIN_TYPES = (pa.int64(), pa.float64(), pa.string())


def _hex_number_cell(data: bytes, names: list[str]) -> bool:
    """Whether a cell outside the text columns starts like a hex number: Arrow infers
    "0x10" as the int 16, pandas (and so this library) as text. A scan for "0x"/"0X" and a
    look at the hits that start a cell; True when unsure (a line with quotes)."""
    for prefix in (b"0x", b"0X"):
        i = data.find(prefix)
        while i != -1:
            start = i
            while start > 0 and data[start - 1] in b' \t+-"':
                start -= 1
            if start == 0 or data[start - 1] in b",\r\n":  # the hit starts a cell
                line = data[data.rfind(b"\n", 0, start) + 1 : start]
                column = line.count(b",")
                if b'"' in line or column >= len(names) or names[column] not in TEXT_COLUMNS:
                    return True
            i = data.find(prefix, i + 2)
    return False


def _bad_row(path, df: pd.DataFrame, column: str, mask, expected: str | None = None) -> ValueError:
    i = int(np.flatnonzero(np.asarray(mask))[0])
    value = df[column].iloc[i]
    value = value.item() if isinstance(value, np.generic) else value
    if expected is None:
        expected = "an integer" if column in INT_COLUMNS else "a number"
    return ValueError(
        f"{path}: column {column!r} has a bad value {value!r} in row {i} "
        f"(line {i + 2}); expected {expected}"
    )


def _read_city_csv(path: Path) -> pd.DataFrame:
    """The careful reader: one city CSV with checked columns and dtypes, or an error naming
    the file, the column, the value and the row."""
    # Text columns keep "NA"/"null" as text; only empty numeric cells count as missing.
    na_values = {c: [""] for c in COLUMNS if c not in TEXT_COLUMNS}
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=na_values)
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"city CSV {path} is empty (needs columns {list(COLUMNS)})") from e
    for col in COLUMNS:
        if col not in df.columns:
            raise ValueError(f"{path}: missing column {col!r} (needs {list(COLUMNS)})")
    numeric_text = [c for c in TEXT_COLUMNS if not pd.api.types.is_string_dtype(df[c])]
    if numeric_text:
        # every cell looked like a number (a panoid of digits): read again keeping the text
        # exactly. Not the default: naming str dtypes doubles pandas' parsing time.
        dtypes = dict.fromkeys(numeric_text, str)
        df = pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=na_values)
    if len(df) == 0:
        raise ValueError(f"city CSV {path} has no rows")
    for col in INT_COLUMNS:
        if pd.api.types.is_bool_dtype(df[col]):  # pandas reads True/False cells as bools
            raise _bad_row(path, df, col, np.ones(len(df), bool))
        if not pd.api.types.is_integer_dtype(df[col]):
            num = pd.to_numeric(df[col], errors="coerce")
            bad = num.isna() | (num != np.floor(num))
            if bad.any():
                raise _bad_row(path, df, col, bad)
            df[col] = num.astype(np.int64)
        elif df[col].dtype != np.int64:
            df[col] = df[col].astype(np.int64)
    for col in FLOAT_COLUMNS:
        if not pd.api.types.is_float_dtype(df[col]) or np.isnan(df[col].to_numpy()).any():
            num = pd.to_numeric(df[col], errors="coerce")
            if num.isna().any():
                raise _bad_row(path, df, col, num.isna())
            df[col] = num.astype(np.float64)
    # Text columns: "" (empty cell) or NaN (a short row) is missing.
    for col in TEXT_COLUMNS:
        missing = df[col].isna() | (df[col] == "")
        if missing.any():
            raise _bad_row(path, df, col, missing, "non-empty text")
    ids = df["city_id"].unique()
    for col, (lo, hi) in VALUE_RANGES.items():
        v = df[col].to_numpy()
        if not (v.min() >= lo and v.max() <= hi):  # NaN-free here; also catches inf
            expected = f"a value >= {lo}" if hi == math.inf else f"a value in {lo}..{hi}"
            raise _bad_row(path, df, col, ~df[col].between(lo, hi), expected)
    if len(ids) != 1:
        raise ValueError(f"{path}: expected one city_id per CSV, found {list(ids)[:5]}")
    return df


# ---------------------------------------------------------------- image paths


def python_relative_paths(df: pd.DataFrame) -> list[str]:
    """`relative_paths` row by row in Python, for a machine without pyarrow: the same
    strings, ~1 us per row."""
    columns = (df[c].tolist() for c in COLUMNS)
    return [
        f"Images/{city}/{file_name(city, place, year, month, deg, lat, lon, panoid)}"
        for place, year, month, deg, city, lat, lon, panoid in zip(*columns, strict=True)
    ]


def relative_paths(columns) -> pa.Array:
    """`Images/<city_id>/<file name>` of every row, as `gsv_cities.gsv_filename` spells it.
    `columns`: a DataFrame, an Arrow table or a dict of columns with the COLUMNS names and
    valid values (as the readers check them)."""
    city = pc.dictionary_encode(_as_arrow(columns["city_id"], pa.string()))
    prefixes = [f"Images/{c}/{c}" for c in city.dictionary.to_pylist()]
    ints = {c: np.asarray(columns[c], dtype=np.int64) for c in INT_COLUMNS}
    n = len(city)
    if n == 0:
        return pa.array([], pa.string())
    head = []  # the fields before lat/lon
    if all(int(ints[c].max()) < 10 ** INT_WIDTHS[c] for c in INT_COLUMNS):
        # "<prefix>_0000130_2018_04_015" as fixed-width bytes (no Arrow join for these fields)
        parts = [b"_"] * (2 * len(INT_COLUMNS) - 1)
        parts[::2] = [_int_digits(ints[c], INT_WIDTHS[c]) for c in INT_COLUMNS]
        if len(prefixes) == 1:
            parts.insert(0, prefixes[0].encode() + b"_")
        else:
            head.append(pa.array(prefixes).take(city.indices))
        head.append(_text_from_bytes(parts, n))
    else:  # a value wider than its padding (northdeg >= 1000): one Arrow array per column
        head.append(pa.array(prefixes).take(city.indices))
        head += [_padded_ints(ints[c], INT_WIDTHS[c]) for c in INT_COLUMNS]
    lat_lon = [float_names(columns["lat"]), float_names(columns["lon"])]
    panoid = _as_arrow(columns["panoid"], pa.string())
    panoid_bytes = _equal_width_bytes(panoid)
    if panoid_bytes is not None:  # 22 characters in the dataset: "<panoid>.jpg" as bytes
        return pc.binary_join_element_wise(
            *head, *lat_lon, _text_from_bytes([panoid_bytes, b".jpg"], n), "_"
        )
    names = pc.binary_join_element_wise(*head, *lat_lon, panoid, "_")
    return pc.binary_join_element_wise(names, ".jpg", "")


def _as_arrow(column, type_: pa.DataType) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.Array):
        return column.cast(type_)
    return pa.array(np.asarray(column, dtype=object), type=type_)


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """[n, width] uint8: the ASCII zero-padded decimals of non-negative ints < 10**width."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers % 10 + ord("0")).astype(np.uint8)


def _int_digits(values: np.ndarray, width: int) -> np.ndarray:
    """_digits, for a column of few distinct values (all of them here) as a gather from the
    digits of its range."""
    lo, hi = int(values.min()), int(values.max())
    if hi - lo >= len(values):
        return _digits(values, width)
    table = _digits(np.arange(lo, hi + 1, dtype=np.int64), width).view(f"V{width}")
    return table[values - lo, 0].view(np.uint8).reshape(len(values), width)


def _text_from_bytes(parts: list[np.ndarray | bytes], n: int) -> pa.Array:
    """One string per row, the concatenation of `parts`: [n, w] uint8 arrays (a w-byte
    value per row) or bytes (the same in every row). One buffer, no per-row work."""
    widths = [len(p) if isinstance(p, bytes) else p.shape[1] for p in parts]
    buffer = np.empty((n, sum(widths)), dtype=np.uint8)
    start = 0
    for part, width in zip(parts, widths, strict=True):
        buffer[:, start : start + width] = (
            np.frombuffer(part, np.uint8) if isinstance(part, bytes) else part
        )
        start += width
    if buffer.size >= 2**31:  # Arrow strings have int32 offsets
        raise ValueError(f"{n} rows make over 2 GiB of path text: read fewer cities at once")
    offsets = np.arange(0, buffer.size + 1, buffer.shape[1], dtype=np.int32)
    return pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(buffer)]
    )


def _equal_width_bytes(text: pa.Array) -> np.ndarray | None:
    """[n, w] uint8 view of a string array whose values all have w >= 1 bytes, else None."""
    if len(text) == 0 or text.null_count:
        return None
    offsets = np.frombuffer(text.buffers()[1], np.int32)[text.offset : text.offset + len(text) + 1]
    widths = np.diff(offsets)
    if widths.min() != widths.max() or widths[0] == 0:
        return None
    data = np.frombuffer(text.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(len(text), int(widths[0]))


def _padded_ints(values: np.ndarray, width: int) -> pa.Array:
    return pc.utf8_lpad(pc.cast(pa.array(values), pa.string()), width, "0")


def float_names(values) -> pa.Array:
    """Python's repr of each float (shortest round trip), as the dataset's file names spell
    lat/lon. Arrow's float -> string cast writes the same shortest digits but another
    notation for whole numbers ("45" for "45.0"), -0.0, magnitudes below 1e-4 (no exponent)
    and large ones (an exponent from ~1e10): those rows (whole numbers, |x| < 1e-4 or
    |x| >= 1e6; rare in coordinates) get Python's repr."""
    floats = np.asarray(values, dtype=np.float64)
    text = pc.cast(pa.array(floats), pa.string())
    magnitude = np.abs(floats)
    odd = (floats == np.trunc(floats)) | (magnitude < 1e-4) | ~(magnitude < 1e6)
    if not odd.any():
        return text
    fixed = pa.array([repr(v) for v in floats[odd].tolist()])
    return pc.replace_with_mask(text, pa.array(odd), fixed)
