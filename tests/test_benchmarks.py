"""load_benchmark: folder and list formats, exact radius ground truth, named sets, errors."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from vprlib import benchmarks
from vprlib.benchmarks import (
    EXPECTED_SIZES,
    load_benchmark,
    parse_utm_filename,
    radius_ground_truth,
)

E0, N0 = 583_000.0, 4_476_000.0  # Pittsburgh-like UTM values (float32 would lose the metres)


def brute_force(db_xy, q_xy, radius):
    d = np.sqrt(((np.asarray(q_xy)[:, None] - np.asarray(db_xy)[None]) ** 2).sum(-1))
    return [np.nonzero(row <= radius)[0] for row in d]


def utm_name(east, north, lat="40.43", lon="-80.01", panoid="pano"):
    return f"@{east:.2f}@{north:.2f}@17@T@{lat}@{lon}@{panoid}@@@@@@@@.jpg"


def make_folder_benchmark(folder: Path, db_xy, q_xy, latlon=True) -> None:
    """Empty .jpg files named in the @utm@ convention (images are read only by extraction)."""
    for sub, xy in (("database", db_xy), ("queries", q_xy)):
        (folder / sub).mkdir(parents=True)
        for i, (e, n) in enumerate(xy):
            ll = {} if latlon else {"lat": "", "lon": ""}
            (folder / sub / utm_name(e, n, panoid=f"p{i:04d}", **ll)).touch()


def test_radius_ground_truth_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(10):
        db = np.round(rng.uniform(0, 400, (300, 2)) + [E0, N0], 2)
        q = np.round(rng.uniform(0, 400, (120, 2)) + [E0, N0], 2)
        q[:10] = db[:10] + [25.0, 0.0]  # exactly on the threshold: included (<=)
        q[10:20] = db[10:20] + [0.0, -25.01]  # just outside
        gt = radius_ground_truth(db, q, 25.0)
        expected = brute_force(db, q, 25.0)
        assert len(gt) == len(q)
        for g, e in zip(gt, expected, strict=True):
            assert g.dtype == np.int64
            np.testing.assert_array_equal(g, e)
        assert all(i in gt[i] for i in range(10))


def test_radius_ground_truth_far_apart_and_empty():
    db = np.array([[E0, N0], [E0 + 1e5, N0 - 3e5]])
    q = np.array([[E0 + 1e5, N0 - 3e5 + 24.9], [E0 + 50, N0]])
    gt = radius_ground_truth(db, q, 25.0)
    np.testing.assert_array_equal(gt[0], [1])
    assert len(gt[1]) == 0
    with pytest.raises(ValueError, match=r"\[N,2\]"):
        radius_ground_truth(db[:, :1], q, 25.0)


def test_parse_utm_filename():
    e, n, lat, lon = parse_utm_filename(
        "/x/@0583885.48@4476108.46@17@T@40.4313885@-80.0110270@Mv_h-w@@002@@@@201110@@.jpg"
    )
    assert (e, n, lat, lon) == (583885.48, 4476108.46, 40.4313885, -80.0110270)
    e, n, lat, lon = parse_utm_filename("@0@1000@@@@@0001@@@@@@@@.jpg")  # SPED-style mock UTM
    assert (e, n) == (0.0, 1000.0) and np.isnan(lat) and np.isnan(lon)
    with pytest.raises(ValueError, match="not_utm.jpg"):
        parse_utm_filename("not_utm.jpg")


def test_folder_format_ground_truth(tmp_path):
    rng = np.random.default_rng(1)
    db = np.round(rng.uniform(0, 150, (60, 2)) + [E0, N0], 2)
    q = np.round(rng.uniform(0, 150, (25, 2)) + [E0, N0], 2)
    make_folder_benchmark(tmp_path / "myset", db, q)
    bench = load_benchmark(tmp_path / "myset", threshold_m=20.0)
    assert bench.fmt == "folder" and bench.name == "myset" and bench.threshold_m == 20.0
    assert bench.num_db == 60 and bench.num_queries == 25
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in bench.db_paths)
    assert bench.db_paths == sorted(bench.db_paths)
    # coordinates come from the names, in file-name order
    names_db = [parse_utm_filename(p)[:2] for p in bench.db_paths]
    np.testing.assert_allclose(bench.db_utm, names_db)
    assert bench.db_latlon.shape == (60, 2)
    expected = brute_force(bench.db_utm, bench.query_utm, 20.0)
    for g, e in zip(bench.ground_truth, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    assert sum(len(g) for g in bench.ground_truth) > 0


def test_folder_format_without_latlon_and_bad_names(tmp_path):
    make_folder_benchmark(tmp_path / "s", [[E0, N0]], [[E0 + 3, N0]], latlon=False)
    bench = load_benchmark(tmp_path / "s")
    assert bench.db_latlon is None and bench.query_latlon is None
    np.testing.assert_array_equal(bench.ground_truth[0], [0])
    (tmp_path / "s" / "queries" / "IMG_0001.jpg").touch()
    with pytest.raises(ValueError, match="IMG_0001.jpg"):
        load_benchmark(tmp_path / "s")


def write_list_benchmark(folder: Path, name: str, n_db=6, n_q=4, gt=None, images=True):
    """`<folder>/datasets_npy/<name>_*.npy` with paths relative to `folder`."""
    npy = folder / "datasets_npy"
    npy.mkdir(parents=True, exist_ok=True)
    db = [f"{name}/db/{i:03d}.jpg" for i in range(n_db)]
    q = [f"{name}/q/{i:03d}.jpg" for i in range(n_q)]
    if images:
        for p in db + q:
            (folder / p).parent.mkdir(parents=True, exist_ok=True)
            (folder / p).touch()
    if gt is None:
        gt = [np.array([i, i + 1]) for i in range(n_q)]
    gt_arr = np.empty(len(gt), dtype=object)
    gt_arr[:] = [np.asarray(g) for g in gt]
    np.save(npy / f"{name}_dbImages.npy", np.array(db))
    np.save(npy / f"{name}_qImages.npy", np.array(q))
    np.save(npy / f"{name}_gt.npy", gt_arr, allow_pickle=True)
    return npy


def test_list_format(tmp_path):
    gt = [np.array([3, 1]), np.array([], dtype=np.int64), np.array([5]), np.array([0, 2])]
    npy = write_list_benchmark(tmp_path, "toy", gt=gt)
    bench = load_benchmark(npy / "toy_dbImages.npy")
    assert bench.fmt == "list" and bench.name == "toy"
    assert bench.root == str(tmp_path.resolve())
    assert bench.db_paths[2] == str(tmp_path.resolve() / "toy/db/002.jpg")
    assert bench.query_paths[-1] == str(tmp_path.resolve() / "toy/q/003.jpg")
    assert [g.tolist() for g in bench.ground_truth] == [[1, 3], [], [5], [0, 2]]
    assert bench.num_without_positives == 1
    assert bench.db_utm is None
    # folder + name gives the same benchmark
    same = load_benchmark(npy / "toy")
    assert same.db_paths == bench.db_paths
    # an explicit image root
    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "toy", other / "toy")
    moved = load_benchmark(npy / "toy_dbImages.npy", root=other)
    assert moved.db_paths[0] == str(other.resolve() / "toy/db/000.jpg")


def test_list_format_names_missing_images_at_load_time(tmp_path):
    """A missing image is reported when the set is loaded, not after the database has been
    extracted; the error names the list file and the images."""
    npy = write_list_benchmark(tmp_path, "toy", n_db=6, n_q=4)
    (tmp_path / "toy/q/002.jpg").unlink()
    (tmp_path / "toy/q/003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 query images listed in .*toy_qImages"):
        load_benchmark(npy / "toy_dbImages.npy")
    assert benchmarks.missing_files(
        [
            str(tmp_path / "toy/q/002.jpg"),
            str(tmp_path / "toy/db/001.jpg"),
            str(tmp_path / "nowhere/x.jpg"),
        ]
    ) == [str(tmp_path / "toy/q/002.jpg"), str(tmp_path / "nowhere/x.jpg")]


def test_named_list_sets_each_in_their_own_image_folder(tmp_path):
    """Nordland's and SPED's lists both hold ref/... and query/... paths: by name each set
    reads its images from its own folder (Nordland/, SPEDTEST/) under the benchmarks root."""
    for name, folder in (("Nordland", "Nordland"), ("SPED", "SPEDTEST")):
        npy = tmp_path / "datasets_npy"
        npy.mkdir(exist_ok=True)
        db, q = [f"ref/{i:05d}.jpg" for i in range(3)], [f"query/{i:05d}.jpg" for i in range(2)]
        for rel in db + q:
            (tmp_path / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / rel).write_bytes(name.encode())
        gt = np.empty(2, dtype=object)
        gt[:] = [np.array([0]), np.array([1, 2])]
        np.save(npy / f"{name}_dbImages.npy", np.array(db))
        np.save(npy / f"{name}_qImages.npy", np.array(q))
        np.save(npy / f"{name}_gt.npy", gt, allow_pickle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sizes differ from the published ones
        nordland = load_benchmark("nordland", root=tmp_path)
        sped = load_benchmark("sped", root=tmp_path)
    assert nordland.db_paths[0] == str(tmp_path / "Nordland/ref/00000.jpg")
    assert sped.db_paths[0] == str(tmp_path / "SPEDTEST/ref/00000.jpg")
    assert Path(sped.query_paths[1]).read_bytes() == b"SPED"


def test_named_list_set_paths_are_absolute_and_folders_match_any_case(tmp_path, monkeypatch):
    """A relative root still gives absolute image paths (a later chdir must not break them);
    the set's folder is found whatever its case (pittsburgh/ for Pittsburgh/)."""
    npy = tmp_path / "bench" / "datasets_npy"
    npy.mkdir(parents=True)
    for rel in ("database/000.jpg", "queries/000.jpg"):
        (tmp_path / "bench" / "pittsburgh" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "bench" / "pittsburgh" / rel).touch()
    gt = np.empty(1, dtype=object)
    gt[:] = [np.array([0])]
    np.save(npy / "pitts30k_test_dbImages.npy", np.array(["database/000.jpg"]))
    np.save(npy / "pitts30k_test_qImages.npy", np.array(["queries/000.jpg"]))
    np.save(npy / "pitts30k_test_gt.npy", gt, allow_pickle=True)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not the published size
        bench = load_benchmark("pitts30k_test", root="bench")
    assert Path(bench.db_paths[0]).is_absolute()
    assert bench.db_paths[0] == str(tmp_path / "bench/pittsburgh/database/000.jpg")
    # images named without a folder, in the working directory
    (tmp_path / "a.jpg").touch()
    assert benchmarks.missing_files(["a.jpg", "b.jpg"]) == ["b.jpg"]


def test_list_format_wrong_root_and_missing_files(tmp_path):
    npy = write_list_benchmark(tmp_path, "toy")
    with pytest.raises(FileNotFoundError, match="root"):
        load_benchmark(npy / "toy_dbImages.npy", root=tmp_path / "nowhere")
    (npy / "toy_gt.npy").unlink()
    with pytest.raises(FileNotFoundError, match="toy_gt.npy"):
        load_benchmark(npy / "toy_dbImages.npy")


def test_list_format_mismatched_lengths(tmp_path):
    npy = write_list_benchmark(tmp_path, "toy", n_q=4, gt=[[0], [1], [2]])
    with pytest.raises(ValueError, match=r"toy_gt\.npy has 3 entries.*toy_qImages\.npy has 4"):
        load_benchmark(npy / "toy_dbImages.npy")


def test_list_format_gt_out_of_range(tmp_path):
    npy = write_list_benchmark(tmp_path, "toy", n_db=6, n_q=2, gt=[[0], [6]])
    with pytest.raises(ValueError, match="query 1 has positive index 6"):
        load_benchmark(npy / "toy_dbImages.npy")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("dense_bool", "dense"),
        ("dense_int", "dense"),
        ("float", "float64"),
        ("rows_with_query_index", "query 0"),
        ("pickled_dict", "single dict"),
        ("dense_object", "dense"),
    ],
)
def test_list_format_refuses_wrong_ground_truth_layouts(tmp_path, layout, message):
    """Layouts that would otherwise load as made-up positives (a [Q, N_db] mask read as
    indices 0/1, floats truncated) or fail with numpy's bare errors: each names the file
    and the expected layout."""
    npy = write_list_benchmark(tmp_path, "toy", n_db=6, n_q=2, gt=[[3], [5]])
    mask = np.zeros((2, 6), dtype=bool)
    mask[0, 3] = mask[1, 5] = True
    rows = np.empty(2, dtype=object)
    rows[:] = [[0, [3]], [1, [5]]]  # VPR-Bench style [query index, positives]
    wrong = {
        "dense_bool": mask,
        "dense_int": mask.astype(np.int64),
        "float": np.array([[0.7], [2.9]]),
        "rows_with_query_index": rows,
        "pickled_dict": np.array({"q0": [3]}, dtype=object),
        "dense_object": mask.astype(np.int64).astype(object),  # ints saved as objects
    }[layout]
    np.save(npy / "toy_gt.npy", wrong, allow_pickle=True)
    with pytest.raises(ValueError, match=message) as info:
        load_benchmark(npy / "toy_dbImages.npy")
    assert "toy_gt.npy" in str(info.value) and "positive database" in str(info.value)


def test_list_format_reads_integer_object_arrays(tmp_path):
    """np.array(lists of equal length, dtype=object) is 2-D of Python ints (SPED's one
    positive per query): integers, so it loads."""
    npy = write_list_benchmark(tmp_path, "toy", n_db=6, n_q=3)
    for gt, want in [
        (np.array([[0], [1], [2]], dtype=object), [[0], [1], [2]]),
        (np.array([[1, 2], [2, 3], [0, 4]], dtype=object), [[1, 2], [2, 3], [0, 4]]),
    ]:
        np.save(npy / "toy_gt.npy", gt, allow_pickle=True)
        bench = load_benchmark(npy / "toy_dbImages.npy")
        assert [g.tolist() for g in bench.ground_truth] == want
        assert all(g.dtype == np.int64 for g in bench.ground_truth)


def test_list_format_pidx_without_qidx_names_the_missing_file(tmp_path):
    npy = write_list_benchmark(tmp_path, "msls_val", n_db=6, n_q=5, gt=[[0]] * 5)
    (npy / "msls_val_gt.npy").rename(npy / "msls_val_pIdx.npy")
    with pytest.raises(FileNotFoundError, match="msls_val_qIdx.npy"):
        load_benchmark("msls_val", root=tmp_path)


def test_msls_official_variant(tmp_path):
    npy = write_list_benchmark(tmp_path, "msls_val", n_db=6, n_q=5, gt=[[0]] * 5)
    (npy / "msls_val_gt.npy").unlink()
    np.save(npy / "msls_val_qIdx.npy", np.array([1, 3, 4]))
    pidx = np.empty(3, dtype=object)
    pidx[:] = [np.array([2]), np.array([0, 5]), np.array([4])]
    np.save(npy / "msls_val_pIdx.npy", pidx, allow_pickle=True)
    with pytest.warns(UserWarning, match="18871 / 740"):
        bench = load_benchmark("msls_val", root=tmp_path)
    assert bench.name == "msls_val"
    assert "official" in bench.variant and "3 queries" in bench.variant
    assert [Path(p).name for p in bench.query_paths] == ["001.jpg", "003.jpg", "004.jpg"]
    assert [g.tolist() for g in bench.ground_truth] == [[2], [0, 5], [4]]


def test_msls_all_queries_variant_is_labelled(tmp_path):
    write_list_benchmark(tmp_path, "msls_val", n_db=6, n_q=5, gt=[[0]] * 5)
    with pytest.warns(UserWarning, match="not comparable"):
        bench = load_benchmark("msls_val", root=tmp_path)
    assert "NOT the official 740" in bench.variant


def test_msls_folder_with_all_queries_is_labelled_not_official(tmp_path):
    """The downloader's msls/val holds every val query: not the 740-query protocol."""
    folder = tmp_path / "msls" / "val"
    make_folder_benchmark(folder, [(0, 0), (100, 0)], [(1, 0), (99, 0), (50, 0)])
    with pytest.warns(UserWarning, match="740"):
        bench = load_benchmark("msls_val", root=tmp_path)
    assert bench.fmt == "folder" and bench.name == "msls_val"
    assert (
        "NOT the official 740-query protocol" in bench.variant and "all 3 queries" in bench.variant
    )


def test_a_folder_above_benchmark_folders_names_them(tmp_path):
    """Passing the downloader's dataset folder instead of its images/test folder."""
    make_folder_benchmark(tmp_path / "pitts30k" / "images" / "test", [(0, 0)], [(1, 0)])
    with pytest.raises(FileNotFoundError, match=r"benchmark folders below it: .*images/test"):
        load_benchmark(tmp_path / "pitts30k" / "images")


def test_sample_formats_agree(bench_root):
    by_list = load_benchmark(bench_root / "datasets_npy" / "gsv_sample_dbImages.npy")
    by_folder = load_benchmark(bench_root / "gsv_sample")
    assert by_list.fmt == "list" and by_folder.fmt == "folder"
    assert by_list.db_paths == by_folder.db_paths
    assert by_list.query_paths == by_folder.query_paths
    assert by_list.num_queries > 0
    for a, b in zip(by_list.ground_truth, by_folder.ground_truth, strict=True):
        np.testing.assert_array_equal(a, b)
    # and both equal a brute-force 25 m search on the coordinates in the names
    for g, e in zip(
        by_folder.ground_truth,
        brute_force(by_folder.db_utm, by_folder.query_utm, 25.0),
        strict=True,
    ):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_allclose(by_list.db_utm, by_folder.db_utm)


def test_named_set_resolution(bench_root, monkeypatch, tmp_path):
    monkeypatch.delenv("VPR_BENCHMARKS_ROOT", raising=False)
    monkeypatch.delenv("VPRLIB_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="VPR_BENCHMARKS_ROOT"):
        load_benchmark("gsv_sample")
    by_root = load_benchmark("gsv_sample", root=bench_root)
    monkeypatch.setenv("VPRLIB_DATA", str(bench_root.parent))  # read at call time
    by_data = load_benchmark("gsv_sample")
    monkeypatch.setenv("VPR_BENCHMARKS_ROOT", str(bench_root))
    by_env = load_benchmark("gsv_sample")
    assert by_root.name == by_data.name == by_env.name == "gsv_sample"
    assert by_root.fmt == "list"  # the list format is preferred when both exist
    assert by_root.query_paths == by_data.query_paths == by_env.query_paths
    # the folder layout of the downloader, found by name; sizes differ -> a warning
    db = [[E0 + 100 * i, N0] for i in range(5)]
    make_folder_benchmark(tmp_path / "pitts30k" / "images" / "test", db, db[:2])
    with pytest.warns(UserWarning, match="10000 / 6816"):
        pitts = load_benchmark("pitts30k_test", root=tmp_path)
    assert pitts.name == "pitts30k_test" and pitts.fmt == "folder"
    assert [g.tolist() for g in pitts.ground_truth] == [[0], [1]]


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        (
            "pitts30k_test",
            ["pitts30k/images/test", "pitts30k_test_dbImages.npy", "VPR-datasets-downloader"],
        ),
        ("msls_val", ["740", "mapillary.com/dataset/places", "11k"]),
        ("nordland", ["VPR-Bench", "+-1", "+-10"]),
        ("sped", ["MubarizZaffar/VPR-Bench", "607"]),
        ("tokyo247", ["tokyo247/images/test"]),
    ],
)
def test_missing_named_set_error(tmp_path, name, needles):
    with pytest.raises(FileNotFoundError) as err:
        load_benchmark(name, root=tmp_path)
    text = str(err.value)
    assert str(tmp_path) in text and name in text
    for needle in needles:
        assert needle in text, (needle, text)


def test_expected_sizes_table():
    assert EXPECTED_SIZES["pitts30k_test"] == (10_000, 6_816)
    assert EXPECTED_SIZES["msls_val"] == (18_871, 740)
    assert EXPECTED_SIZES["nordland"] == (27_592, 2_760)


def test_bad_threshold_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="threshold_m"):
        load_benchmark(tmp_path, threshold_m=0)
    (tmp_path / "e" / "database").mkdir(parents=True)
    (tmp_path / "e" / "queries").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_benchmark(tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_benchmark(tmp_path)


def test_threshold_recomputes_list_ground_truth_or_refuses(bench_root, tmp_path):
    """A list-format set's stored positives are the 25 m ones: another threshold is recomputed
    from the UTM in the names (brute force agrees) or refused when the names carry none."""
    npy = bench_root / "datasets_npy" / "gsv_sample_dbImages.npy"
    standard = load_benchmark(npy)
    assert np.isnan(standard.threshold_m)  # positives as stored in _gt.npy
    near = load_benchmark(npy, threshold_m=5.0)
    assert near.threshold_m == 5.0 and "5 m" in near.variant
    expected = brute_force(standard.db_utm, standard.query_utm, 5.0)
    assert [g.tolist() for g in near.ground_truth] == [e.tolist() for e in expected]
    assert sum(map(len, near.ground_truth)) < sum(map(len, standard.ground_truth))
    by_name = load_benchmark("gsv_sample", root=bench_root, threshold_m=5.0)
    assert [g.tolist() for g in by_name.ground_truth] == [e.tolist() for e in expected]
    no_utm = write_list_benchmark(tmp_path, "toy")
    with pytest.raises(ValueError, match=r"threshold_m=5 cannot apply to benchmark 'toy'"):
        load_benchmark(no_utm / "toy_dbImages.npy", threshold_m=5.0)


def test_bare_name_is_a_set_even_beside_a_folder_of_that_name(bench_root, tmp_path, monkeypatch):
    (tmp_path / "gsv_sample" / "images").mkdir(parents=True)  # not a benchmark folder itself
    monkeypatch.chdir(tmp_path)
    bench = load_benchmark("gsv_sample", root=bench_root)
    assert bench.name == "gsv_sample" and bench.num_queries > 0
    with pytest.raises(FileNotFoundError, match="benchmark path not found: .*typo"):
        load_benchmark(tmp_path / "typo" / "pitts30k_test", root=bench_root)


def test_byte_string_path_lists(tmp_path):
    npy = write_list_benchmark(tmp_path, "toy")
    for kind in ("dbImages", "qImages"):
        paths = np.load(npy / f"toy_{kind}.npy", allow_pickle=True)
        np.save(npy / f"toy_{kind}.npy", np.array([str(p).encode() for p in paths]))
    bench = load_benchmark(npy / "toy_dbImages.npy")
    assert bench.db_paths[0] == str(tmp_path.resolve() / "toy/db/000.jpg")
