"""ipywidgets browsers built and driven without a frontend: change values, read the output."""

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from vprlib import plots, widgets  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _png_size(output_item) -> tuple[int, int]:
    data = output_item["data"]["image/png"]
    raw = base64.b64decode(data) if isinstance(data, str) else data
    with Image.open(io.BytesIO(raw)) as im:
        return im.size


@pytest.fixture()
def gsv(tmp_path):
    """Tiny GSV-like table: PRS places 0 (3 images, dates shuffled) and 1; OSL place 100000."""
    rows = []
    spec = [
        ("PRS", 0, [(2019, 5), (2012, 1), (2016, 7)]),
        ("PRS", 1, [(2014, 2)] * 2),
        ("OSL", 100000, [(2013, 3), (2011, 9)]),
    ]
    for city, place, dates in spec:
        for j, (year, month) in enumerate(dates):
            rel = f"Images/{city}/{city}_{place}_{j}.jpg"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 16), (place % 250, 30 * j, 0)).save(tmp_path / rel)
            rows.append(
                dict(
                    city_id=city,
                    place=place,
                    year=year,
                    month=month,
                    northdeg=400,
                    lat=48.8,
                    lon=2.3,
                    panoid=f"pano{place}x{j}",
                    path=rel,
                )
            )
    return pd.DataFrame(rows), tmp_path


def test_place_browser_updates_with_city_and_place(gsv):
    df, root = gsv
    box = widgets.place_browser(df, root)
    city, place = box.controls["city"], box.controls["place"]
    assert city.options == ("OSL", "PRS") and city.value == "OSL"
    assert place.value == 100000
    out = box.output.outputs
    assert len(out) == 2 and _png_size(out[0])[0] > 100
    html = out[1]["data"]["text/html"]
    assert html.index("pano100000x1") < html.index("pano100000x0")  # 2011 before 2013
    city.value = "PRS"
    assert [v for _, v in place.options] == [0, 1] and place.value == 0
    assert "3 images" in place.options[0][0]
    titles = [ax.get_title() for ax in box.last_figure.axes if ax.images]
    assert titles == ["2012-01  heading 40°", "2016-07  heading 40°", "2019-05  heading 40°"]
    place.value = 1
    assert "pano1x1" in box.output.outputs[1]["data"]["text/html"]
    assert len([ax for ax in box.last_figure.axes if ax.images]) == 2


def test_place_browser_rejects_bad_input(gsv):
    df, root = gsv
    with pytest.raises(KeyError, match="path"):
        widgets.place_browser(df.drop(columns=["path"]), root)
    with pytest.raises(FileNotFoundError, match="missing"):
        widgets.place_browser(df, root / "missing")
    with pytest.raises(KeyError, match="panoid"):
        widgets.place_browser(df.drop(columns=["panoid"]), root)


def test_place_browser_shows_a_render_error_and_keeps_no_stale_figure(gsv):
    df, root = gsv
    (root / df.loc[df["place"] == 0, "path"].iloc[0]).unlink()  # one PRS image is gone
    box = widgets.place_browser(df, root)
    assert box.last_figure is not None  # OSL, complete
    before = plt.get_fignums()
    box.controls["city"].value = "PRS"  # place 0: its figure cannot be drawn
    assert box.last_figure is None
    (shown,) = box.output.outputs
    html = shown["data"]["text/html"]
    assert "cannot show place 0" in html and "image not found" in html and "PRS_0_0.jpg" in html
    assert plt.get_fignums() == before  # the half-drawn figure was closed
    box.controls["place"].value = 1  # a complete place shows again
    assert box.last_figure is not None and len(box.output.outputs) == 2


def _results(tmp_path, latlon=True):
    paths = []
    for i in range(7):
        p = tmp_path / f"im{i}.jpg"
        Image.new("RGB", (16, 12), (30 * i, 90, 0)).save(p)
        paths.append(str(p))
    correct = np.array([[True, False, False], [False, True, False], [False, False, False]])
    results = SimpleNamespace(
        benchmark="toy",
        query_paths=paths[:3],
        db_paths=paths[3:],
        predictions=np.array([[0, 1, 2], [3, 0, 1], [2, 3, 1]]),
        distances=np.array([[0.1, 0.5, 0.9], [0.2, 0.4, 0.6], [0.3, 0.35, 0.8]]),
        correct=correct,
    )
    bench = SimpleNamespace(
        query_latlon=np.array([[45.0, 7.0], [45.1, 7.1], [45.2, 7.2]]) if latlon else None,
        db_latlon=np.array([[45.0, 7.0001], [45.3, 7.3], [45.4, 7.4], [45.5, 7.5]]),
    )
    return results, bench


def _frames(fig) -> list[str]:
    return [mcolors.to_hex(ax.spines["top"].get_edgecolor()) for ax in fig.axes]


def test_retrieval_browser_query_k_and_failures(tmp_path):
    results, bench = _results(tmp_path)
    box = widgets.retrieval_browser(results, bench, k=2)
    q, k, fail = (box.controls[n] for n in ("query", "k", "only_failures"))
    assert box.current_query == 0 and len(box.last_figure.axes) == 3
    g, r, b = plots.CORRECT_COLOUR, plots.WRONG_COLOUR, plots.QUERY_COLOUR
    assert _frames(box.last_figure) == [b, g, r]
    out = box.output.outputs
    assert "image/png" in out[0]["data"] and "text/html" in out[1]["data"]  # figure + map
    k.value = 3
    assert len(box.last_figure.axes) == 4 and _frames(box.last_figure) == [b, g, r, r]
    q.value = 1
    assert box.current_query == 1 and _frames(box.last_figure) == [b, r, g, r]
    assert "d=0.400" in box.last_figure.axes[2].get_title()
    fail.value = True  # failures at top-1: queries 1 and 2
    assert q.max == 1 and q.value == 0 and box.current_query == 1
    q.value = 1
    assert box.current_query == 2 and _frames(box.last_figure) == [b, r, r, r]
    assert "no positive in top-3" in box.children[1].value
    fail.value = False
    assert q.max == 2 and box.current_query == 0


def test_retrieval_browser_without_coordinates_or_failures(tmp_path):
    results, bench = _results(tmp_path, latlon=False)
    box = widgets.retrieval_browser(results, bench, k=3)
    assert len(box.output.outputs) == 1  # no map without query coordinates
    assert len(box.last_figure.axes) == 4
    results.correct[:, 0] = True
    box = widgets.retrieval_browser(results, None, k=1)
    box.controls["only_failures"].value = True
    assert box.current_query is None and "No failures" in box.children[1].value
    with pytest.raises(ValueError, match="k must be in 1..3"):
        widgets.retrieval_browser(results, None, k=4)


def test_retrieval_browser_shows_a_render_error_for_the_new_query(tmp_path):
    results, bench = _results(tmp_path)
    Path(results.query_paths[1]).unlink()
    box = widgets.retrieval_browser(results, bench, k=2)
    before = plt.get_fignums()
    box.controls["query"].value = 1
    assert box.current_query == 1 and box.last_figure is None
    (shown,) = box.output.outputs  # no stale figure of query 0 beside the new info line
    assert "cannot show query 1" in shown["data"]["text/html"]
    assert "query 1" in box.children[1].value
    assert plt.get_fignums() == before
