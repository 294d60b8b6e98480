"""The committed sample (data/sample) has the published layouts and the promised properties."""

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GSV_FIELDS = ["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"]


def _load_make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "data" / "make_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_sample = _load_make_sample()


def haversine(lat1, lon1, lat2, lon2):
    """Independent scalar haversine (metres)."""
    r = 6371008.8
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * r * math.asin(math.sqrt(a))


def read_csvs(gsv_root):
    """{csv stem: list of row dicts} read with the csv module (no pandas)."""
    out = {}
    for path in sorted((gsv_root / "Dataframes").glob("*.csv")):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == GSV_FIELDS, path
            out[path.stem] = list(reader)
    return out


def test_csv_rows_match_image_files(gsv_root):
    cities = read_csvs(gsv_root)
    listed = set()
    for stem, rows in cities.items():
        for row in rows:
            lat, lon = float(row["lat"]), float(row["lon"])
            assert repr(lat) == row["lat"] and repr(lon) == row["lon"]  # full-precision CSV
            name = (
                f"{row['city_id']}_{int(row['place_id']):07d}_{int(row['year']):04d}_"
                f"{int(row['month']):02d}_{int(row['northdeg']):03d}_{lat}_{lon}_{row['panoid']}.jpg"
            )
            path = gsv_root / "Images" / row["city_id"] / name
            assert path.is_file(), f"{stem}: {path} missing"
            # file-name fields equal the CSV fields (split limited: the panoid may hold '_')
            parts = name[: -len(".jpg")].split("_", 7)
            assert parts[0] == row["city_id"] and int(parts[1]) == int(row["place_id"])
            assert float(parts[5]) == lat and float(parts[6]) == lon
            assert parts[7] == row["panoid"]
            listed.add(path)
    on_disk = set((gsv_root / "Images").glob("*/*"))
    assert on_disk == listed  # every image file is listed in a CSV


def test_cities_places_and_distances(gsv_root):
    cities = read_csvs(gsv_root)
    assert len(cities) >= 4
    ids = {stem: {r["city_id"] for r in rows} for stem, rows in cities.items()}
    assert all(len(v) == 1 for v in ids.values())
    assert any(stem != next(iter(v)) for stem, v in ids.items())  # a code folder (PRS)
    assert any(float(r["lat"]) < 0 for rows in cities.values() for r in rows)  # southern city
    panoids = [r["panoid"] for rows in cities.values() for r in rows]
    assert all(len(p) == 22 and set(p) <= set(make_sample.PANOID_CHARS) for p in panoids)
    assert any("_" in p for p in panoids) and any("-" in p for p in panoids)
    northdeg = [int(r["northdeg"]) for rows in cities.values() for r in rows]
    assert max(northdeg) >= 360
    for stem, rows in cities.items():
        places = {}
        for r in rows:
            places.setdefault(int(r["place_id"]), []).append((float(r["lat"]), float(r["lon"])))
            assert 2007 <= int(r["year"]) <= 2021 and 1 <= int(r["month"]) <= 12
        assert len(places) >= 25, stem
        sizes = [len(v) for v in places.values()]
        assert min(sizes) >= 4 and max(sizes) <= 12, stem
        assert sum(s >= 8 for s in sizes) >= 2, stem
        keys = sorted(places)
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                d = min(haversine(*p, *q) for p in places[a] for q in places[b])
                assert d >= 100.0, f"{stem}: places {a} and {b} are {d:.1f} m apart"


def _folder_names(bench_root, kind):
    return sorted(p.name for p in (bench_root / "gsv_sample" / kind).glob("*.jpg"))


def test_eval_set_formats_and_ground_truth(bench_root, gsv_root):
    db, q = _folder_names(bench_root, "database"), _folder_names(bench_root, "queries")
    assert len(q) >= 40 and len(db) > len(q)
    for name in db + q:
        parts = name.split("@")
        assert len(parts) == 16 and parts[0] == "" and parts[-1] == ".jpg", name
        east, north, zone, letter = make_sample.latlon_to_utm(float(parts[5]), float(parts[6]))
        assert parts[1] == f"{east:010.2f}" and parts[2] == f"{north:010.2f}"
        assert (int(parts[3]), parts[4]) == (zone, letter)
    npy = bench_root / "datasets_npy"
    db_list = np.load(npy / "gsv_sample_dbImages.npy")
    q_list = np.load(npy / "gsv_sample_qImages.npy")
    gt = np.load(npy / "gsv_sample_gt.npy", allow_pickle=True)
    assert list(db_list) == [f"gsv_sample/database/{n}" for n in db]
    assert list(q_list) == [f"gsv_sample/queries/{n}" for n in q]
    assert all((bench_root / p).is_file() for p in list(db_list) + list(q_list))
    # brute force from the UTM fields of the names, independent of make_sample's helper
    utm = {n: (float(n.split("@")[1]), float(n.split("@")[2])) for n in db + q}
    assert gt.dtype == object and len(gt) == len(q)
    for qi, qn in enumerate(q):
        want = [
            i for i, dn in enumerate(db) if math.dist(utm[qn], utm[dn]) <= make_sample.THRESHOLD_M
        ]
        assert gt[qi].dtype == np.int64 and gt[qi].tolist() == want
    assert sum(len(g) == 0 for g in gt) == 2  # queries without positives
    positives = set(np.concatenate(list(gt)).tolist())
    assert len(positives) < len(db)  # database distractors
    # evaluation places are not training places: nothing within 100 m
    train = [
        (float(r["lat"]), float(r["lon"])) for rows in read_csvs(gsv_root).values() for r in rows
    ]
    for name in db[:5] + q[:5]:
        lat, lon = float(name.split("@")[5]), float(name.split("@")[6])
        assert min(haversine(lat, lon, *t) for t in train) > 100.0


def test_utm_against_published_value():
    # the `utm` package documents utm.from_latlon(51.2, 7.5) == (395201.31, 5673135.24, 32, 'U')
    east, north, zone, letter = make_sample.latlon_to_utm(51.2, 7.5)
    assert (zone, letter) == (32, "U")
    assert abs(east - 395201.3103811303) < 0.01 and abs(north - 5673135.241182375) < 0.01
    assert make_sample.utm_zone(-34.6, -58.4) == (21, "H")
    assert make_sample.latlon_to_utm(-34.6, -58.4)[1] > 6e6  # southern false northing
    with pytest.raises(ValueError, match="latitude"):
        make_sample.utm_zone(85.0, 0.0)


def test_generation_is_deterministic_and_small(tmp_path, sample_root):
    out = make_sample.make_sample(tmp_path / "sample")
    new = {p.relative_to(out): p for p in out.rglob("*") if p.is_file()}
    old = {p.relative_to(sample_root): p for p in sample_root.rglob("*") if p.is_file()}
    assert new.keys() == old.keys()
    differing = [str(k) for k in new if new[k].read_bytes() != old[k].read_bytes()]
    assert not differing, f"{len(differing)} files differ, e.g. {differing[:3]}"
    assert sum(p.stat().st_size for p in old.values()) < 5_000_000
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind
