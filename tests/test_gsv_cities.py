"""GSV-Cities file names, dataframes, pandas helpers and the place dataset."""

import csv
import importlib.util
import io
import itertools
import math
import re
import shutil
import string
import subprocess
import sys
import warnings
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.io import decode_jpeg, read_file
from torchvision.transforms.v2 import functional as F

from vprlib import gsv_cities as G
from vprlib import gsv_csv
from vprlib import gsv_dataset as D
from vprlib.transforms import IMAGENET_MEAN, IMAGENET_STD, to_model_input

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

COLUMNS = ["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"]

# ---------------------------------------------------------------- file names


def test_parse_reference_example():
    name = "London_0000130_2018_04_015_51.4861_-0.0895151_6jFjb3wGyCkcBfq4k559ag.jpg"
    row = G.parse_gsv_filename(name)
    assert row == {
        "city_id": "London",
        "place_id": 130,
        "year": 2018,
        "month": 4,
        "northdeg": 15,
        "lat": 51.4861,
        "lon": -0.0895151,
        "panoid": "6jFjb3wGyCkcBfq4k559ag",
    }
    assert G.gsv_filename(row) == name
    upper = G.parse_gsv_filename("/some/dir/" + name[:-4] + ".JPG")
    assert upper == row and G.gsv_filename(upper, ext=".JPG") == name[:-4] + ".JPG"


def test_parse_underscores_negative_and_big_northdeg():
    name = "PRS_0000007_2009_11_584_-34.60371234567891_-58.3816_a_b-c__d-_efghijklmnopq.jpg"
    row = G.parse_gsv_filename(name)
    assert row["northdeg"] == 584 and row["panoid"] == "a_b-c__d-_efghijklmnopq"
    assert row["lat"] == -34.60371234567891 and row["lon"] == -58.3816
    assert G.gsv_filename(row) == name
    # a pandas row works as input too
    assert G.gsv_filename(pd.Series(row)) == name


@settings(max_examples=300)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=40))
def test_float_names_are_python_repr(values):
    """The vectorised lat/lon spelling of read_gsv_dataframes is exactly repr(float)."""
    values += [0.0, -0.0, 45.0, 1e-5, 1e-4, 123456.789, 1e16, 5e-324, 51.4861, -0.0895151]
    assert gsv_csv.float_names(pd.Series(values)).to_pylist() == [repr(v) for v in values]


def test_relative_paths_of_no_rows():
    empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in COLUMNS})
    assert gsv_csv.relative_paths(empty).to_pylist() == []


def gsv_rows(max_northdeg: int):
    """Valid rows of several cities (northdeg up to max_northdeg)."""
    row = st.fixed_dictionaries(
        {
            "place_id": st.integers(0, 99_999),
            "year": st.integers(0, 9999),
            "month": st.integers(1, 12),
            "northdeg": st.integers(0, max_northdeg),
            "city_id": st.sampled_from(["PRS", "London", "SaoPaulo"]),
            "lat": st.floats(-90, 90),
            "lon": st.floats(-180, 180),
            "panoid": st.text(string.ascii_letters + string.digits + "_-", min_size=1),
        }
    )
    return st.lists(row, min_size=1, max_size=20)


PATH_BUILDERS = {  # with pyarrow (the default) and without it (python_relative_paths)
    "arrow": lambda df: gsv_csv.relative_paths(df).to_pylist(),
    "python": gsv_csv.python_relative_paths,
}


@pytest.mark.parametrize("builder", list(PATH_BUILDERS))
@pytest.mark.parametrize("max_northdeg", [999, 2000])  # one fixed-width int field, or not
@settings(max_examples=60)
@given(data=st.data())
def test_relative_paths_equal_gsv_filename_per_row(builder, max_northdeg, data):
    rows = data.draw(gsv_rows(max_northdeg))
    want = [f"Images/{r['city_id']}/{G.gsv_filename(r)}" for r in rows]
    assert PATH_BUILDERS[builder](pd.DataFrame(rows)) == want


def test_file_name_spells_the_dataset_names():
    """Written out by hand from a real GSV-Cities file name (REFERENCE.md)."""
    name = gsv_csv.file_name(
        "London", 130, 2018, 4, 15, 51.4861, -0.0895151, "6jFjb3wGyCkcBfq4k559ag"
    )
    assert name == "London_0000130_2018_04_015_51.4861_-0.0895151_6jFjb3wGyCkcBfq4k559ag.jpg"
    assert gsv_csv.file_name("X", 1, 7, 12, 1234, -0.0, 45.0, "p", ".JPG") == (
        "X_0000001_0007_12_1234_-0.0_45.0_p.JPG"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "London_0000130_2018_04_015_51.4861_-0.0895151.jpg",  # no panoid
        "London_0000130_2018_04_015_51.4861_-0.0895151_abc.png",  # extension
        "London_00x0130_2018_04_015_51.4861_-0.0895151_abc.jpg",  # place_id
        "London_0000130_2018_13_015_51.4861_-0.0895151_abc.jpg",  # month 13
        "London_0000130_2018_04_015_91.5_-0.0895151_abc.jpg",  # latitude
        "London_0000130_18_04_015_51.4861_-0.0895151_abc.jpg",  # year
        "",
    ],
)
def test_parse_rejects_bad_names(bad):
    with pytest.raises(ValueError) as info:
        G.parse_gsv_filename(bad)
    assert repr(bad) in str(info.value)


def test_gsv_filename_rejects_bad_rows():
    row = G.parse_gsv_filename("London_0000130_2018_04_015_51.4861_-0.0895151_abc.jpg")
    with pytest.raises(KeyError, match="panoid"):
        G.gsv_filename({k: v for k, v in row.items() if k != "panoid"})
    with pytest.raises(ValueError, match="place_id"):
        G.gsv_filename({**row, "place_id": 1.5})
    with pytest.raises(ValueError, match="city_id"):
        G.gsv_filename({**row, "city_id": "New_York"})
    with pytest.raises(ValueError, match="month"):
        G.gsv_filename({**row, "month": 0})


ID_CHARS = string.ascii_letters + string.digits
PANOID_CHARS = ID_CHARS + "_-"
rows = st.fixed_dictionaries(
    {
        "city_id": st.text(ID_CHARS, min_size=1, max_size=12),
        "place_id": st.integers(0, 10**8),
        "year": st.integers(1000, 9999),
        "month": st.integers(1, 12),
        "northdeg": st.integers(0, 10**4),
        "lat": st.floats(-90, 90, allow_nan=False),
        "lon": st.floats(-180, 180, allow_nan=False),
        "panoid": st.text(PANOID_CHARS, min_size=1, max_size=30),
    }
)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_filename_round_trip(row):
    name = G.gsv_filename(row)
    parsed = G.parse_gsv_filename(name)
    assert parsed == row
    assert G.gsv_filename(parsed) == name


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_arbitrary_text_is_valid_or_value_error(text):
    try:
        row = G.parse_gsv_filename(text)
    except ValueError as e:
        assert repr(text.rsplit("/", 1)[-1]) in str(e) or "out of range" in str(e)
    else:
        assert G.parse_gsv_filename(G.gsv_filename(row)) == row


@settings(max_examples=200, deadline=None)
@given(rows, st.integers(0, 7), st.sampled_from(["", "x", "_", "1.2.3", "-"]))
def test_parse_corrupted_field_raises(row, field, junk):
    parts = G.gsv_filename(row)[:-4].split("_", 7)
    if field == 7:  # the panoid may be anything without '/': corrupt the extension instead
        name = "_".join(parts) + ".jpeg"
    else:
        parts[field] = junk if field else junk + "_"
        name = "_".join(parts) + ".jpg"
    try:
        parsed = G.parse_gsv_filename(name)
    except ValueError as e:
        assert repr(name) in str(e) or "out of range" in str(e)
    else:  # a junk value that still forms a valid name must round-trip exactly
        assert G.gsv_filename(parsed) == name


# ---------------------------------------------------------------- dataframes


def csv_rows(gsv_root):
    out = {}
    for p in sorted((gsv_root / "Dataframes").glob("*.csv")):
        with open(p, newline="") as f:
            out[p.stem] = list(csv.DictReader(f))
    return out


def test_read_gsv_dataframes_sample(gsv_root):
    df = G.read_gsv_dataframes(gsv_root)
    assert list(df.columns) == COLUMNS + ["place", "path"]
    raw = csv_rows(gsv_root)
    assert len(df) == sum(len(r) for r in raw.values())
    for c in ("place_id", "year", "month", "northdeg", "place"):
        assert df[c].dtype == np.int64
    assert df["lat"].dtype == np.float64 and df["lon"].dtype == np.float64
    # place: constant within (city_id, place_id), unique across cities
    n_pairs = df.groupby(["city_id", "place_id"]).ngroups
    assert df["place"].nunique() == n_pairs
    assert df.groupby(["city_id", "place_id"])["place"].nunique().max() == 1
    # paths exist and match the rows
    for r in df.sample(40, random_state=0).itertuples():
        assert (gsv_root / r.path).is_file()
        assert G.parse_gsv_filename(r.path)["panoid"] == r.panoid
    # values equal the CSV text
    paris = df[df["city_id"] == "PRS"]
    assert [repr(v) for v in paris["lat"]] == [r["lat"] for r in raw["Paris"]]


def test_cities_selection_and_stable_place(gsv_root):
    full = G.read_gsv_dataframes(gsv_root)
    paris = G.read_gsv_dataframes(gsv_root, cities="Paris")
    by_code = G.read_gsv_dataframes(gsv_root, cities=["PRS"])
    pd.testing.assert_frame_equal(paris, by_code)
    assert set(paris["city_id"]) == {"PRS"}
    sub = full[full["city_id"] == "PRS"].reset_index(drop=True)
    pd.testing.assert_frame_equal(paris, sub)  # same place ids when read alone
    two = G.read_gsv_dataframes(gsv_root, cities=["London", "Boston"])
    assert list(dict.fromkeys(two["city_id"])) == ["London", "Boston"]
    with pytest.raises(ValueError, match="unknown city 'Atlantis'.*Boston.*Paris \\(PRS\\)"):
        G.read_gsv_dataframes(gsv_root, cities=["Atlantis"])


def test_scan_equals_read(gsv_root):
    read = G.read_gsv_dataframes(gsv_root).sort_values("path", ignore_index=True)
    scan = G.scan_gsv_images(gsv_root)
    pd.testing.assert_frame_equal(read, scan)
    one = G.scan_gsv_images(gsv_root, cities="Paris")
    assert set(one["city_id"]) == {"PRS"} and len(one) == (read["city_id"] == "PRS").sum()
    with pytest.raises(ValueError, match="unknown city"):
        G.scan_gsv_images(gsv_root, cities="Nowhere")


def small_tree(tmp_path, rows=None, city="Testville", city_id="TST"):
    """A tiny GSV tree with real JPEGs: returns (root, list of file names)."""
    root = tmp_path / "gsv"
    (root / "Dataframes").mkdir(parents=True)
    (root / "Images" / city_id).mkdir(parents=True)
    if rows is None:
        rows = [
            {
                "place_id": p,
                "year": 2010 + j,
                "month": 1 + j,
                "northdeg": 10 * j,
                "city_id": city_id,
                "lat": 45.0 + p * 0.01 + j * 1e-5,
                "lon": -73.5 - p * 0.01,
                "panoid": f"pano_{p}-{j}".ljust(22, "x"),
            }
            for p in range(3)
            for j in range(5)
        ]
    names = []
    for i, r in enumerate(rows):
        name = G.gsv_filename(r)
        Image.new("RGB", (40, 30), (i * 10 % 255, 80, 160)).save(root / "Images" / city_id / name)
        names.append(name)
    pd.DataFrame(rows).to_csv(root / "Dataframes" / f"{city}.csv", index=False)
    return root, names


def test_a_root_one_level_off_gets_a_hint(sample_root):
    with pytest.raises(FileNotFoundError, match=r"did you mean .*GSV-Cities\?"):
        G.read_gsv_dataframes(sample_root)
    with pytest.raises(FileNotFoundError, match=r"did you mean .*GSV-Cities\?"):
        G.read_gsv_dataframes(sample_root / "GSV-Cities" / "Dataframes")


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*Dataframes"):
        G.read_gsv_dataframes(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Dataframes"):
        G.read_gsv_dataframes(tmp_path / "empty")
    root, names = small_tree(tmp_path)
    csv_path = root / "Dataframes" / "Testville.csv"
    good = csv_path.read_text()
    # missing column
    pd.read_csv(csv_path).drop(columns="northdeg").to_csv(csv_path, index=False)
    with pytest.raises(ValueError, match="Testville.csv.*'northdeg'"):
        G.read_gsv_dataframes(root)
    # non-numeric value: file, column and row named
    bad = pd.read_csv(io.StringIO(good))
    bad["year"] = bad["year"].astype(object)
    bad.loc[3, "year"] = "20x3"
    bad.to_csv(csv_path, index=False)
    with pytest.raises(ValueError, match="Testville.csv.*'year'.*'20x3'.*row 3"):
        G.read_gsv_dataframes(root)
    bad = pd.read_csv(io.StringIO(good))
    bad.loc[4, "lat"] = np.nan
    bad.to_csv(csv_path, index=False)
    with pytest.raises(ValueError, match="'lat'.*row 4"):
        G.read_gsv_dataframes(root)
    # empty CSV and header-only CSV
    csv_path.write_text("")
    with pytest.raises(ValueError, match="Testville.csv is empty"):
        G.read_gsv_dataframes(root)
    csv_path.write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(ValueError, match="Testville.csv has no rows"):
        G.read_gsv_dataframes(root)
    csv_path.write_text(good)
    assert len(G.read_gsv_dataframes(root)) == len(names)


def test_missing_images_error_or_drop(tmp_path):
    root, names = small_tree(tmp_path)
    for n in names[:2]:
        (root / "Images" / "TST" / n).unlink()
    with pytest.raises(FileNotFoundError) as info:
        G.read_gsv_dataframes(root)
    msg = str(info.value)
    assert "2 of 15 rows" in msg and names[0] in msg and "on_missing" in msg
    with pytest.warns(UserWarning, match="2 of 15 rows.*dropped"):
        df = G.read_gsv_dataframes(root, on_missing="drop")
    assert len(df) == 13 and names[0] not in "".join(df["path"])
    nocheck = G.read_gsv_dataframes(root, check_files=False)
    assert len(nocheck) == 15 and nocheck["path"].str.endswith(".jpg").all()
    with pytest.raises(ValueError, match="on_missing"):
        G.read_gsv_dataframes(root, on_missing="ignore")


def test_upper_case_extension_and_extra_columns(tmp_path):
    root, names = small_tree(tmp_path)
    folder = root / "Images" / "TST"
    (folder / names[0]).rename(folder / (names[0][:-4] + ".JPG"))
    csv_path = root / "Dataframes" / "Testville.csv"
    df = pd.read_csv(csv_path)
    df["extra"] = "x"
    df.to_csv(csv_path, index=False)
    out = G.read_gsv_dataframes(root)
    assert out.loc[0, "path"].endswith(".JPG") and (root / out.loc[0, "path"]).is_file()
    assert (out["extra"] == "x").all()
    assert out["path"].str.endswith(".jpg").sum() == len(names) - 1


def test_blank_line_after_the_header(tmp_path):
    """pandas skips blank lines; the city-id probe must too."""
    root, names = small_tree(tmp_path)
    csv_path = root / "Dataframes" / "Testville.csv"
    header, rest = csv_path.read_text().split("\n", 1)
    expected = G.read_gsv_dataframes(root)
    csv_path.write_text(header + "\n\n" + rest)
    assert len(pd.read_csv(csv_path)) == len(expected)
    pd.testing.assert_frame_equal(G.read_gsv_dataframes(root), expected)


def test_scan_refuses_names_the_parser_refuses(tmp_path):
    """str.extract searches; a name must match whole, with the parser's range checks."""
    root, names = small_tree(tmp_path)
    folder = root / "Images" / "TST"
    parts = names[0].split("_")
    month_13 = "_".join(parts[:3] + ["13"] + parts[4:])
    for bad in ("._" + names[0], month_13):  # a macOS resource fork; month 13
        (folder / bad).write_bytes((folder / names[0]).read_bytes())
        with pytest.raises(ValueError, match=re.escape(bad)):
            G.scan_gsv_images(root)
        with pytest.raises(ValueError):
            G.parse_gsv_filename(bad)
        (folder / bad).unlink()
    assert len(G.scan_gsv_images(root)) == len(names)


# ---------------------------------------------------------------- pandas helpers


def test_helpers_and_reference_recipes(gsv_root):
    df = G.read_gsv_dataframes(gsv_root)
    london = df[df["city_id"] == "London"]
    # the REFERENCE recipe, as users write it, on one city equals filter_min_images
    recipe = london[london.groupby("place_id")["place_id"].transform("size") >= 8]
    pd.testing.assert_frame_equal(recipe, G.filter_min_images(london, 8))
    assert len(recipe) > 0 and recipe.groupby("place_id").size().min() >= 8
    # ... and runs on the multi-city frame too
    assert len(df[df.groupby("place_id")["place_id"].transform("size") >= 8]) > 0
    big = G.filter_min_images(df, 8)
    counts = df.groupby("place").size()
    assert set(big["place"]) == set(counts[counts >= 8].index)
    # hemispheres: only Buenos Aires is south
    assert set(G.filter_hemisphere(df, "south")["city_id"]) == {"BuenosAires"}
    assert len(G.filter_hemisphere(df, "north")) == len(df[df["lat"] > 0])
    with pytest.raises(ValueError, match="hemisphere"):
        G.filter_hemisphere(df, "east")
    # dates compose with the other filters
    summer = G.filter_dates(df, years=range(2012, 2016), months=[6, 7, 8])
    assert summer["year"].between(2012, 2015).all() and summer["month"].isin([6, 7, 8]).all()
    want = df[(df.year >= 2012) & (df.year <= 2015) & df.month.isin([6, 7, 8])]
    assert len(summer) == len(want)
    assert len(G.filter_dates(df, years=2015)) == (df.year == 2015).sum()
    combined = G.filter_min_images(G.filter_hemisphere(df, "north"), 6)
    assert (combined["lat"] > 0).all() and combined.groupby("place").size().min() >= 6
    with pytest.raises(ValueError, match="months"):
        G.filter_dates(df, months=[13])


def test_city_summary_against_direct_computation(gsv_root):
    df = G.read_gsv_dataframes(gsv_root)
    s = G.city_summary(df)
    assert set(s.index) == set(df["city_id"])
    prs = df[df["city_id"] == "PRS"]
    per = prs.groupby("place_id").size()
    row = s.loc["PRS"]
    assert row["places"] == 26 and row["images"] == len(prs)
    assert math.isclose(row["img_per_place_mean"], per.mean())
    assert (row["img_per_place_min"], row["img_per_place_max"]) == (per.min(), per.max())
    assert (row["year_min"], row["year_max"]) == (prs.year.min(), prs.year.max())
    h = (prs.lat.max() - prs.lat.min()) * 111.32
    w = (prs.lon.max() - prs.lon.min()) * 111.32 * math.cos(math.radians(prs.lat.mean()))
    assert math.isclose(row["area_km2"], h * w, rel_tol=1e-3)
    assert G.min_place_distance_m(df) >= 100.0


# ---------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def ds_args(gsv_root):
    return dict(root=gsv_root, cities=["Paris", "London"], image_size=(48, 64))


def test_dataset_items(ds_args, gsv_root):
    ds = D.GSVCitiesDataset(**ds_args, img_per_place=4, min_img_per_place=6)
    df = G.read_gsv_dataframes(gsv_root, cities=["Paris", "London"])
    sizes = df.groupby("place").size()
    assert len(ds) == (sizes >= 6).sum() and ds.num_images == sizes[sizes >= 6].sum()
    assert set(ds.dataframe["place"]) == set(sizes[sizes >= 6].index)
    images, labels = ds[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 48, 64)
    assert labels.dtype == torch.int64 and labels.unique().numel() == 1
    all_labels = [int(ds[i][1][0]) for i in range(len(ds))]
    assert len(set(all_labels)) == len(ds)
    batch, lab = ds.collate_fn([ds[i] for i in range(3)])
    assert batch.shape == (3, 4, 3, 48, 64) and lab.shape == (3, 4)
    x = ds.batch_to_device(batch, "cpu")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    want = (batch.flatten(0, 1).float() / 255 - mean) / std
    assert x.dtype == torch.float32 and torch.allclose(x, want, atol=1e-6)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="img_per_place"):
        D.GSVCitiesDataset(**ds_args, img_per_place=5, min_img_per_place=4)


def _expected(gsv_root, paths, size):
    return torch.stack(
        [
            F.resize(decode_jpeg(read_file(str(gsv_root / p))), list(size), antialias=True)
            for p in paths
        ]
    )


def test_random_draws_are_distinct_images_of_the_labelled_place(ds_args, gsv_root):
    """Training's default path: the K images of item i come from the place its label names,
    all different (drawn without replacement), and not always the same K of that place."""
    ds = D.GSVCitiesDataset(**ds_args, augment=False, img_per_place=4, min_img_per_place=6)
    df = ds.dataframe
    for i in (0, 5, len(ds) - 1):
        place = int(ds[i][1][0])
        rows = df[df["place"] == place]
        pool = _expected(gsv_root, rows["path"], ds.image_size)
        drawn = set()
        for epoch in range(4):
            ds.set_epoch(epoch)
            picks = [
                next(j for j, p in enumerate(pool) if torch.equal(img, p)) for img in ds[i][0]
            ]  # StopIteration: an image of another place
            assert len(set(picks)) == 4, picks
            drawn.update(picks)
        assert len(drawn) > 4  # epochs draw different subsets of the place's >= 6 images


def test_most_recent_choice_without_augmentation(ds_args, gsv_root):
    ds = D.GSVCitiesDataset(**ds_args, random_sample=False, augment=False)
    df = ds.dataframe
    for i in (0, 7, len(ds) - 1):
        place = int(ds[i][1][0])
        rows = df[df["place"] == place].sort_values(["year", "month"], ascending=False)
        expected = _expected(gsv_root, rows["path"].iloc[:4], ds.image_size)
        assert torch.equal(ds[i][0], expected)


def test_random_choice_depends_on_seed_epoch_index_only(ds_args):
    ds = D.GSVCitiesDataset(**ds_args, augment=False, min_img_per_place=4)
    big = [i for i in range(len(ds)) if ds._counts[i] >= 7]
    a = [ds[i][0] for i in big]
    ds.set_epoch(1)
    b = [ds[i][0] for i in big]
    assert sum(not torch.equal(x, y) for x, y in zip(a, b, strict=True)) >= len(big) // 2
    ds.set_epoch(0)
    assert all(torch.equal(ds[i][0], x) for i, x in zip(reversed(big), reversed(a), strict=True))
    other = D.GSVCitiesDataset(**ds_args, augment=False, seed=1)
    assert any(not torch.equal(other[i][0], x) for i, x in zip(big, a, strict=True))


def test_same_batches_with_0_or_2_workers(ds_args):
    ds = D.GSVCitiesDataset(**ds_args)
    ds.set_epoch(3)

    def batches(workers):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=4, num_workers=workers, collate_fn=ds.collate_fn
        )
        return [b for b, _ in itertools.islice(loader, 3)]

    b0, b2 = batches(0), batches(2)
    assert all(torch.equal(x, y) for x, y in zip(b0, b2, strict=True))
    ds.set_epoch(4)
    assert not torch.equal(batches(0)[0], b0[0])


def test_corrupt_image_error_and_skip(tmp_path):
    root, names = small_tree(tmp_path)
    # names[4] is the most recent image of place 0, so it is the first one tried
    bad = root / "Images" / "TST" / names[4]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    for decode in ("cpu", "gpu"):
        ds = D.GSVCitiesDataset(root, image_size=(16, 16), random_sample=False, decode=decode)
        with pytest.raises(ValueError, match=names[4]):
            ds[0]
        skip = D.GSVCitiesDataset(
            root, image_size=(16, 16), random_sample=False, on_corrupt="skip", decode=decode
        )
        with pytest.warns(UserWarning, match=names[4]):
            images, labels = skip[0]
        assert len(labels) == 4 and len(images) == 4
        if decode == "gpu":
            assert [p.rsplit("/", 1)[-1] for p in images.paths] == names[3::-1]
        else:
            want = _expected(root, [f"Images/TST/{n}" for n in names[3::-1]], (16, 16))
            plain = D.GSVCitiesDataset(
                root, image_size=(16, 16), random_sample=False, on_corrupt="skip", augment=False
            )
            with pytest.warns(UserWarning):
                assert torch.equal(plain[0][0], want)
    bad.write_bytes(b"")
    (root / "Images" / "TST" / names[3]).write_bytes(b"not a jpeg")
    # too few readable images left in the place -> clear error
    strict = D.GSVCitiesDataset(
        root, image_size=(16, 16), img_per_place=4, min_img_per_place=5, on_corrupt="skip"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="only 3 readable images"):
            strict[0]


def test_every_decode_mode_reads_what_the_cpu_reads(tmp_path):
    """A JPEG with padding after its end marker and a PNG under a .jpg name: decode="cpu"
    reads them, so "gpu" and "mixed" (fit's default on CUDA) must too, to the same pixels."""
    root, names = small_tree(tmp_path)
    folder = root / "Images" / "TST"
    padded, png = folder / names[4], folder / names[3]  # the two most recent of place 0
    padded.write_bytes(padded.read_bytes() + bytes(3000))  # a long trailer: checked on the CPU
    Image.open(png).save(png, format="PNG")
    kw = dict(image_size=(16, 16), random_sample=False, augment=False)
    want, _ = D.GSVCitiesDataset(root, decode="cpu", **kw)[0]
    for decode in ("gpu", "mixed"):
        ds = D.GSVCitiesDataset(root, decode=decode, **kw)
        images, _ = ds.collate_fn([ds[0]])
        got = ds.batch_to_device(images, torch.device("cpu"))
        assert torch.equal(got, to_model_input(want, torch.device("cpu"))), decode
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # a broken non-JPEG: refused at load
    with pytest.raises(ValueError, match=names[3]):
        D.GSVCitiesDataset(root, decode="gpu", **kw)[0]


def test_gpu_path_on_cpu_matches_cpu_path(ds_args, gsv_root):
    for augment in (False, True):
        cpu = D.GSVCitiesDataset(**ds_args, augment=augment)
        gpu = D.GSVCitiesDataset(**ds_args, augment=augment, decode="gpu")
        items = [gpu[i] for i in range(4)]
        enc, labels = gpu.collate_fn(items)
        assert isinstance(enc, D.EncodedImages) and len(enc) == 16 and enc.shape == (4, 4)
        # decoding equals torchvision's CPU decode of the same files
        for data, path in zip(enc.data[:4], enc.paths[:4], strict=True):
            assert torch.equal(data, read_file(path))
        x_gpu = gpu.batch_to_device(enc, "cpu")
        x_cpu_u8, labels_cpu = cpu.collate_fn([cpu[i] for i in range(4)])
        assert torch.equal(labels, labels_cpu)
        assert torch.allclose(x_gpu, cpu.batch_to_device(x_cpu_u8, "cpu"))
    # the per-image augmentations differ between images of the same batch
    plain = D.GSVCitiesDataset(**ds_args, augment=False, decode="gpu")
    flat = plain.batch_to_device(plain.collate_fn([plain[0]])[0], "cpu")
    aug = gpu.batch_to_device(gpu.collate_fn([gpu[0]])[0], "cpu")
    diffs = (aug - flat).abs().flatten(1).mean(1)
    assert diffs.unique().numel() == 4


def test_dataset_from_filtered_dataframe(gsv_root):
    df = G.filter_hemisphere(G.read_gsv_dataframes(gsv_root), "south")
    ds = D.GSVCitiesDataset(gsv_root, dataframe=df, image_size=(32, 32))
    assert set(ds.dataframe["city_id"]) == {"BuenosAires"} and len(ds) == 26
    with pytest.raises(KeyError, match="place"):
        D.GSVCitiesDataset(gsv_root, dataframe=df.drop(columns="place"))


def test_copied_root_works(tmp_path, gsv_root):
    # paths are relative: a copied tree works from its new place
    shutil.copytree(gsv_root / "Dataframes", tmp_path / "Dataframes")
    shutil.copytree(gsv_root / "Images" / "PRS", tmp_path / "Images" / "PRS")
    df = G.read_gsv_dataframes(tmp_path, cities="PRS")
    assert (tmp_path / df.loc[0, "path"]).is_file()


@pytest.mark.parametrize("script", ["loader", "dataframes"])
def test_bench_scripts_small(repo_root, script, capsys):
    # run in-process (torch is already imported): the scripts' --small smoke mode
    spec = importlib.util.spec_from_file_location(
        f"bench_{script}", repo_root / "bench" / f"{script}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(["--small"])
    finally:
        torch.set_num_threads(threads)  # the loader bench pins one thread
    out = capsys.readouterr().out
    ratio = float(out.split("ratio")[1].split(":")[1].split("x")[0])
    assert ratio > 0


def test_short_csv_row_names_the_missing_text_column(tmp_path):
    (tmp_path / "Dataframes").mkdir()
    (tmp_path / "Dataframes" / "London.csv").write_text(
        "place_id,year,month,northdeg,city_id,lat,lon,panoid\n"
        "1,2018,4,15,London,51.4861,-0.0895151,abcdefghijklmnopqrstuv\n"
        "2,2018,4,15,London,51.4871,-0.0895151\n"
    )
    with pytest.raises(ValueError, match=r"London\.csv: column 'panoid'.*line 3.*non-empty text"):
        G.read_gsv_dataframes(tmp_path, check_files=False)


def test_short_first_row_names_the_city_id_column(tmp_path):
    (tmp_path / "Dataframes").mkdir()
    (tmp_path / "Dataframes" / "London.csv").write_text(
        "place_id,year,month,northdeg,city_id,lat,lon,panoid\n1,2018,4\n"
    )
    with pytest.raises(
        ValueError, match=r"London\.csv: the first data row has 3 fields.*'city_id'"
    ):
        G.read_gsv_dataframes(tmp_path, check_files=False)


def test_two_csvs_listing_the_same_images_are_refused(tmp_path):
    """A copied CSV of the same city would count each image twice in its place; a city split
    into CSVs of different images, or choosing one of the two, is fine."""
    root, names = small_tree(tmp_path)
    csvs = root / "Dataframes"
    whole = pd.read_csv(csvs / "Testville.csv")
    whole.to_csv(csvs / "Testville_copy.csv", index=False)
    with pytest.raises(ValueError, match=r"Testville\.csv and .*Testville_copy\.csv.*TST.*both"):
        G.read_gsv_dataframes(root)
    assert len(G.read_gsv_dataframes(root, cities=["Testville_copy"])) == len(names)
    (csvs / "Testville.csv").unlink()  # the city split in two CSVs of different images
    whole[whole["place_id"] < 2].to_csv(csvs / "Testville_a.csv", index=False)
    whole[whole["place_id"] >= 2].to_csv(csvs / "Testville_copy.csv", index=False)
    split = G.read_gsv_dataframes(root)
    assert len(split) == len(names) and not split["path"].duplicated().any()
    assert split["place"].nunique() == 3


# ---------------------------------------------------------------- fast and careful CSV readers


def read_city_both_ways(path, order):
    """(fast-or-careful result, careful-only result) of gsv_csv.read_city; an exception is
    returned as its type and message. Also checks that the careful reader gives the same
    without pyarrow (paths spelled in Python)."""

    def attempt():
        try:
            return gsv_csv.read_city(path, order)
        except ValueError as e:
            return (type(e), str(e))

    default = attempt()
    with mock.patch.object(gsv_csv, "_read_plain_csv", return_value=None):
        careful = attempt()
    with mock.patch.object(gsv_csv, "HAVE_ARROW", False):
        without_arrow = attempt()
    if isinstance(careful, tuple):
        assert without_arrow == careful
    else:
        pd.testing.assert_frame_equal(without_arrow, careful)
    return default, careful


def test_fast_reader_reads_the_sample_as_the_careful_one(gsv_root):
    csvs = sorted((gsv_root / "Dataframes").glob("*.csv"))
    ids = sorted(pd.read_csv(p)["city_id"].iloc[0] for p in csvs)
    order = {c: i for i, c in enumerate(ids)}
    for path in csvs:
        assert gsv_csv._read_plain_csv(path) is not None, path  # the fast path is taken
        fast, careful = read_city_both_ways(path, order)
        pd.testing.assert_frame_equal(fast, careful)


HEADER = ",".join(COLUMNS)
ROW = "7,2015,4,15,TST,51.4861,-0.0895151,6jFjb3wGyCkcBfq4k559ag"
ROW2 = "8,2016,5,16,TST,51.5,-0.09,0xFjb3wGyCkcBfq4k559ag"  # a panoid that starts with 0x
# (file text, whether the fast reader takes it): either way both readers must agree
CSV_VARIANTS = {
    "plain": (f"{HEADER}\n{ROW}\n{ROW2}\n", True),
    "bom_crlf": (f"\ufeff{HEADER}\r\n{ROW}\r\n{ROW2}\r\n", True),
    "quoted": (f"{HEADER}\n" + ",".join(f'"{c}"' for c in ROW.split(",")) + f"\n{ROW2}\n", True),
    "index_column": (f",{HEADER}\n0,{ROW}\n1,{ROW2}\n", True),
    "int_written_as_float": (f"{HEADER}\n{ROW.replace(',2015,', ',2015.0,')}\n", True),
    "wide_northdeg": (f"{HEADER}\n{ROW.replace(',15,', ',1234,')}\n", True),
    "panoids_of_two_lengths": (f"{HEADER}\n{ROW}\n{ROW2}xyz\n", True),
    "quoted_newline_and_comma": (f'{HEADER},n\n{ROW},"a\nb"\n{ROW2},"c,d"\n', True),
    "extra_text_and_float": (f"{HEADER},a,b\n{ROW},x,1.5\n{ROW2},y,2\n", True),
    "plus_sign": (f"{HEADER}\n{ROW.replace(',4,', ',+4,')}\n", None),
    "exponent_int": (f"{HEADER}\n{ROW.replace(',2015,', ',2.015e3,')}\n", None),
    "minus_zero_lat": (f"{HEADER}\n{ROW.replace('51.4861', '-0.0')}\n", False),
    "hex_place_id": (f"{HEADER}\n{ROW.replace('7,', '0x7,', 1)}\n", False),
    "hex_extra": (f"{HEADER},h\n{ROW},0x1F\n", False),
    "extra_dates": (f"{HEADER},d\n{ROW},2020-01-01\n", False),
    "extra_bools": (f"{HEADER},b\n{ROW},true\n", False),
    "extra_empty_cell": (f"{HEADER},e\n{ROW},\n{ROW2},3\n", False),
    "fraction_in_int": (f"{HEADER}\n{ROW.replace(',2015,', ',2015.5,')}\n", False),
    "missing_value": (f"{HEADER}\n{ROW.replace(',TST,', ',,')}\n", False),
    "short_row": (f"{HEADER}\n{ROW.rsplit(',', 1)[0]}\n", False),
    "two_cities": (f"{HEADER}\n{ROW}\n{ROW2.replace('TST', 'TSU')}\n", False),
    "duplicate_column": (f"{HEADER},year\n{ROW},2015\n", False),
    "no_rows": (f"{HEADER}\n", False),
}


@pytest.mark.parametrize("name", list(CSV_VARIANTS))
def test_fast_and_careful_readers_agree(tmp_path, name):
    text, fast_taken = CSV_VARIANTS[name]
    path = tmp_path / "Testville.csv"
    path.write_text(text, encoding="utf-8", newline="")
    if fast_taken is not None:
        assert (gsv_csv._read_plain_csv(path) is not None) == fast_taken
    fast, careful = read_city_both_ways(path, {"TST": 2})
    if isinstance(careful, tuple):
        assert fast == careful  # the same error
    else:
        pd.testing.assert_frame_equal(fast, careful)
        rows = careful.to_dict("records")
        assert careful["place"].tolist() == [2 * G.PLACE_STRIDE + r["place_id"] for r in rows]
        assert careful["path"].tolist() == [f"Images/TST/{G.gsv_filename(r)}" for r in rows]


def test_reads_the_sample_without_pyarrow(gsv_root, tmp_path):
    """vprlib must import and read GSV-Cities with pyarrow absent (DESIGN: torch, torchvision,
    numpy, pandas, pillow, faiss and pytorch-metric-learning alone). A fresh interpreter
    that cannot import pyarrow (nor can pandas) writes its table; it must equal ours."""
    out = tmp_path / "table.csv"
    code = (
        "import sys; sys.modules['pyarrow'] = None\n"
        "import vprlib\n"
        "from vprlib import gsv_csv\n"
        "assert not gsv_csv.HAVE_ARROW\n"
        f"vprlib.read_gsv_dataframes({str(gsv_root)!r}).to_csv({str(out)!r}, index=False)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    want = G.read_gsv_dataframes(gsv_root)
    got = pd.read_csv(out, dtype={"panoid": str, "city_id": str}, keep_default_na=False)
    assert got["path"].tolist() == want["path"].tolist()
    assert got["place"].tolist() == want["place"].tolist()
    assert got.columns.tolist() == want.columns.tolist()


def test_threads_give_the_same_table(gsv_root):
    one = G.read_gsv_dataframes(gsv_root, threads=1)
    pd.testing.assert_frame_equal(one, G.read_gsv_dataframes(gsv_root, threads=3))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="threads"):
            G.read_gsv_dataframes(gsv_root, threads=bad)


def test_helpers_on_tables_without_place_or_place_id(gsv_root):
    df = G.read_gsv_dataframes(gsv_root)
    raw = df.drop(columns=["place"])  # a city CSV as pandas reads it
    assert G.min_place_distance_m(raw) == G.min_place_distance_m(df)
    keyed = df[["place", "path"]]  # grouping by `place` needs no place_id
    counts = df.groupby("place").size()
    assert set(G.filter_min_images(keyed, 8)["place"]) == set(counts[counts >= 8].index)
    with pytest.raises(TypeError, match="years must be an int or ints, got '2017'"):
        G.filter_dates(df, years="2017")


def test_a_place_without_coordinates_does_not_hide_its_city(gsv_root):
    df = G.read_gsv_dataframes(gsv_root)
    boston = df[df["city_id"] == "Boston"].copy()
    expected = G.min_place_distance_m(boston)
    lone = boston["place"] == boston["place"].iloc[0]
    boston.loc[lone, ["lat", "lon"]] = np.nan
    rest = boston[~lone]
    assert np.isfinite(expected)
    assert G.min_place_distance_m(boston) == G.min_place_distance_m(rest) < np.inf


def test_dataset_works_in_spawned_workers(gsv_root):
    """macOS/Windows (and Python >= 3.14 on Linux) start DataLoader workers without fork: the
    dataset, RandAugment included, must pickle, and give the same batch there."""
    ds = D.GSVCitiesDataset(gsv_root, image_size=(32, 32), seed=3)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=1, collate_fn=ds.collate_fn, multiprocessing_context="spawn"
    )
    images, labels = next(iter(loader))
    want_images, want_labels = ds.collate_fn([ds[0], ds[1]])
    assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
