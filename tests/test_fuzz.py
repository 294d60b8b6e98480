"""Property tests (hypothesis) of the input parsers and the metric, on random inputs.

The file-name round trip and corrupted fields are fuzzed in test_gsv_cities.py; here: names
with junk around them, the city CSV reader (random valid tables come back exactly, the same
from the fast Arrow reader and the careful pandas one; a random bad cell is an error naming
the file and the column), and recall@K against brute force.
"""

import csv
import re
import string
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vprlib import gsv_csv, gsv_filename, parse_gsv_filename, read_gsv_dataframes, recall_at_k

COLUMNS = ["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"]
INT_COLUMNS = ["place_id", "year", "month", "northdeg"]
FLOAT_COLUMNS = ["lat", "lon"]
ID_CHARS = string.ascii_letters + string.digits
PANOID_CHARS = ID_CHARS + "_-"
# pandas reads these cell texts as missing values: a city called "NA" is not supported
PANDAS_NA = {"NA", "NaN", "nan", "N/A", "NULL", "null", "None", "n/a", "NAN", "<NA>"}
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

city_ids = st.text(ID_CHARS, min_size=1, max_size=10).filter(lambda s: s not in PANDAS_NA)
gsv_rows = st.fixed_dictionaries(
    {
        "place_id": st.integers(0, 99_999),
        "year": st.integers(1000, 9999),
        "month": st.integers(1, 12),
        "northdeg": st.integers(0, 999),
        "lat": st.floats(-90, 90, allow_nan=False),
        "lon": st.floats(-180, 180, allow_nan=False),
        "panoid": st.text(PANOID_CHARS, min_size=22, max_size=22),
    }
)


def write_city(folder: Path, stem: str, rows: list[dict], columns: list[str]) -> Path:
    """A city CSV as the dataset has them (floats as Python's repr), columns in any order."""
    path = folder / "Dataframes" / f"{stem}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([repr(row[c]) if c in FLOAT_COLUMNS else row[c] for c in columns])
    return path


# ---------------------------------------------------------------------------- file names


@FUZZ
@given(gsv_rows, city_ids, st.text(min_size=1, max_size=8), st.sampled_from([".jpeg", ".png", ""]))
def test_parse_rejects_junk_after_the_name_and_other_extensions(row, city, junk, ext):
    name = gsv_filename({**row, "city_id": city})
    assert parse_gsv_filename("some/folder/" + name) == {**row, "city_id": city}
    for bad in (name + junk, name[:-4] + ext):
        if bad.endswith((".jpg", ".JPG")) and "/" not in bad[len(name) :]:
            continue  # junk that itself ends in .jpg may form another valid name
        with pytest.raises(ValueError, match="GSV-Cities"):
            parse_gsv_filename(bad)


# ---------------------------------------------------------------------------- city CSVs


cities = st.lists(
    st.tuples(city_ids, st.lists(gsv_rows, min_size=1, max_size=12)),
    min_size=1,
    max_size=3,
    unique_by=lambda c: c[0],
)


@FUZZ
@given(cities, st.permutations(COLUMNS), st.booleans())
def test_csv_reader_returns_exactly_the_rows(tables, columns, extra):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for city, rows in tables:
            rows = [{**r, "city_id": city, "note": f"r{i}"} for i, r in enumerate(rows)]
            write_city(root, city, rows, list(columns) + (["note"] if extra else []))
        df = read_gsv_dataframes(root, check_files=False)
        with mock.patch.object(gsv_csv, "_read_plain_csv", return_value=None):
            careful = read_gsv_dataframes(root, check_files=False)  # pandas only
    pd.testing.assert_frame_equal(df, careful)

    order = {c: i for i, c in enumerate(sorted(c for c, _ in tables))}
    want = [
        {**r, "city_id": c, "place": order[c] * 10**5 + r["place_id"]}
        for c, rows in sorted(tables)
        for r in rows
    ]
    assert len(df) == len(want)
    for col in INT_COLUMNS + ["place"]:
        assert df[col].dtype == np.int64, col
        assert df[col].tolist() == [w[col] for w in want], col
    for col in FLOAT_COLUMNS:  # exact: the image file names are built from these values
        assert df[col].dtype == np.float64
        assert df[col].tolist() == [w[col] for w in want], col
    for col in ("city_id", "panoid"):
        assert df[col].tolist() == [w[col] for w in want], col
    assert df["path"].tolist() == [f"Images/{w['city_id']}/{gsv_filename(w)}" for w in want]
    assert ("note" in df.columns) == extra


NOT_A_NUMBER = ["", " ", "x", "1.2.3", "nan", "12a", "--3", "1,5", "0x10"]
BAD_CELLS = {  # non-numeric, missing, or outside what the column can hold
    "place_id": [*NOT_A_NUMBER, "2.5", "True", "-1", "100000"],
    "year": [*NOT_A_NUMBER, "2.5", "True", "-1", "10000"],
    "month": [*NOT_A_NUMBER, "2.5", "True", "0", "13"],
    "northdeg": [*NOT_A_NUMBER, "2.5", "True", "-1"],
    "lat": [*NOT_A_NUMBER, "inf", "-inf", "90.5", "-1e3"],
    "lon": [*NOT_A_NUMBER, "inf", "180.000001", "-181"],
    "city_id": [""],  # text columns: only a missing value is invalid
    "panoid": [""],
}


@pytest.mark.parametrize("column", list(BAD_CELLS))
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_csv_reader_names_file_and_column_of_a_bad_cell(column, data):
    """Every bad value of the column, at a random row of a random table."""
    city = data.draw(city_ids)
    rows = [{**r, "city_id": city} for r in data.draw(st.lists(gsv_rows, min_size=1, max_size=8))]
    good = data.draw(st.lists(gsv_rows, min_size=1, max_size=3))
    i = data.draw(st.integers(0, len(rows) - 1))
    for junk in BAD_CELLS[column]:
        bad_rows = [*rows[:i], {**rows[i], column: junk}, *rows[i + 1 :]]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            # a valid city read first: the error must still point at the bad file
            write_city(root, "Aaaville", [{**r, "city_id": city + "0"} for r in good], COLUMNS)
            path = write_city(root, "Fuzzville", bad_rows, COLUMNS)
            with pytest.raises(ValueError) as err:
                read_gsv_dataframes(root, check_files=False)
        message = str(err.value)
        assert str(path) in message and repr(column) in message, (junk, message)
        assert re.search(rf"row {i}\b", message), (junk, message)


@FUZZ
@given(cities, st.sampled_from(COLUMNS))
def test_csv_reader_names_file_of_a_missing_column(tables, dropped):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = [
            write_city(root, c, [{**r, "city_id": c} for r in rows], COLUMNS) for c, rows in tables
        ]
        victim = paths[-1]
        kept = [c for c in COLUMNS if c != dropped]
        write_city(
            root, victim.stem, [{**r, "city_id": tables[-1][0]} for r in tables[-1][1]], kept
        )
        with pytest.raises(ValueError) as err:
            read_gsv_dataframes(root, check_files=False)
    assert victim.name in str(err.value) and repr(dropped) in str(err.value)


# ---------------------------------------------------------------------------- recall@K


@st.composite
def retrievals(draw):
    """Predictions like search() gives (distinct db indices per query) and ground truth
    (distinct positive indices per query, possibly none)."""
    n_db = draw(st.integers(1, 30))
    n_q = draw(st.integers(1, 15))
    kmax = draw(st.integers(1, min(n_db, 10)))
    preds = [draw(st.permutations(range(n_db)))[:kmax] for _ in range(n_q)]
    gt = [
        np.array(sorted(draw(st.sets(st.integers(0, n_db - 1), max_size=4))), dtype=np.int64)
        for _ in range(n_q)
    ]
    ks = sorted(draw(st.sets(st.integers(1, kmax), min_size=1, max_size=kmax)))
    return np.array(preds, dtype=np.int64).reshape(n_q, kmax), gt, ks


def brute_force_recall(pred, gt, k, skip_empty):
    rows = [i for i in range(len(gt)) if len(gt[i]) or not skip_empty]
    hits = [any(int(p) in set(gt[i].tolist()) for p in pred[i, :k]) for i in rows]
    return sum(hits) / len(rows)


@settings(max_examples=60, deadline=None)
@given(retrievals(), st.booleans())
def test_recall_at_k_matches_brute_force(data, skip_empty):
    pred, gt, ks = data
    if skip_empty and all(len(g) == 0 for g in gt):
        with pytest.raises(ValueError, match="no queries"):
            recall_at_k(pred, gt, ks=ks, skip_empty=True)
        return
    rec = recall_at_k(pred, gt, ks=ks, skip_empty=skip_empty)
    assert list(rec) == ks
    for k in ks:
        assert rec[k] == pytest.approx(brute_force_recall(pred, gt, k, skip_empty), abs=1e-12)
    values = [rec[k] for k in ks]
    assert values == sorted(values) and all(0.0 <= v <= 1.0 for v in values)
