"""Matplotlib figures: panel counts, plotted values, frame colours, titles and PNG output."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vprlib import plots  # noqa: E402
from vprlib.transforms import normalize  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _df() -> pd.DataFrame:
    # places 0..2 with 4, 4, 6 images; years, months and headings chosen by hand
    place = [0] * 4 + [1] * 4 + [2] * 6
    year = [2012, 2012, 2015, 2015, 2015, 2016, 2016, 2016, 2016, 2020, 2020, 2020, 2020, 2020]
    month = [1, 1, 7, 7, 7, 7, 12, 12, 3, 3, 3, 3, 3, 3]
    northdeg = [0, 5, 90, 95, 180, 584, 270, 359, 10, 20, 30, 40, 50, 60]
    return pd.DataFrame({"place": place, "year": year, "month": month, "northdeg": northdeg})


def _has_text(fig) -> None:
    assert fig._suptitle is not None or any(ax.get_title() for ax in fig.axes)
    for ax in fig.axes:
        if ax.images:  # image panels carry titles/frames instead of axis labels
            continue
        assert ax.get_xlabel() and ax.get_ylabel(), ax


def _bar_heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches]


def test_images_per_place_histogram_counts():
    fig = plots.plot_images_per_place(_df())
    ax = fig.axes[0]
    heights = _bar_heights(ax)
    assert heights == [2, 0, 1]  # two places with 4 images, none with 5, one with 6
    assert "3 places" in ax.get_title()
    _has_text(fig)


def test_years_and_months_bars():
    df = _df()
    ax = plots.plot_years(df).axes[0]
    assert _bar_heights(ax) == df["year"].value_counts().sort_index().tolist()
    fig = plots.plot_months(df)
    heights = _bar_heights(fig.axes[0])
    assert len(heights) == 12
    assert heights[0] == 2 and heights[6] == 4 and heights[11] == 2 and heights[1] == 0
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][6] == "Jul"
    _has_text(fig)


def test_headings_polar_wraps_above_360():
    fig = plots.plot_headings(_df(), bins=36)
    ax = fig.axes[0]
    assert ax.name == "polar"
    heights = _bar_heights(ax)
    assert len(heights) == 36 and sum(heights) == 14
    assert heights[224 // 10] == 1  # 584 % 360 = 224
    assert heights[0] == 2  # 0 and 5
    assert heights[35] == 1  # 359


def test_show_batch_grid_uint8_and_float():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 4, 3, 8, 10), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([[7] * 4, [11] * 4, [42] * 4])
    fig = plots.show_batch(images, labels)
    assert len(fig.axes) == 12
    assert fig.axes[4].get_ylabel() == "place 11"
    np.testing.assert_array_equal(fig.axes[5].images[0].get_array(), images[1, 1].permute(1, 2, 0))
    # float input is taken as normalised and undone exactly
    fig = plots.show_batch(normalize(images), labels[:, 0], max_places=2)
    assert len(fig.axes) == 8 and "first 2 shown" in fig._suptitle.get_text()
    np.testing.assert_array_equal(fig.axes[7].images[0].get_array(), images[1, 3].permute(1, 2, 0))
    with pytest.raises(ValueError, match="labels"):
        plots.show_batch(images, labels[:2])
    with pytest.raises(ValueError, match=r"\[P,K,3,H,W\]"):
        plots.show_batch(images[0], labels)


@pytest.fixture()
def image_files(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (16, 12), (40 * i, 0, 0)).save(p)
        paths.append(str(p))
    return paths


def _spine_colour(ax) -> str:
    colours = {mcolors.to_hex(s.get_edgecolor()) for s in ax.spines.values()}
    assert len(colours) == 1
    return colours.pop()


def test_plot_retrieval_panels_and_frames(image_files):
    correct = [False, True, True, False]
    fig = plots.plot_retrieval(image_files[0], image_files[1:5], correct, [0.1, 0.2, 0.3, 0.4])
    assert len(fig.axes) == 5
    assert _spine_colour(fig.axes[0]) == plots.QUERY_COLOUR
    expected = [plots.CORRECT_COLOUR if c else plots.WRONG_COLOUR for c in correct]
    assert [_spine_colour(ax) for ax in fig.axes[1:]] == expected
    assert "d=0.300" in fig.axes[3].get_title()
    assert all(ax.images for ax in fig.axes)
    with pytest.raises(ValueError, match="same length"):
        plots.plot_retrieval(image_files[0], image_files[1:3], [True], [0.1, 0.2])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        plots.plot_retrieval("nope.jpg", image_files[1:2], [True], [0.1])


def test_plot_retrieval_grid_from_results(image_files):
    from types import SimpleNamespace

    res = SimpleNamespace(
        benchmark="toy",
        query_paths=image_files[:2],
        db_paths=image_files[2:],
        predictions=np.array([[0, 1, 2], [3, 2, 1]]),
        distances=np.array([[0.1, 0.2, 0.3], [0.2, 0.3, 0.4]]),
        correct=np.array([[True, False, False], [False, False, True]]),
    )
    fig = plots.plot_retrieval_grid(res, [0, 1], k=2)
    assert len(fig.axes) == 6
    assert _spine_colour(fig.axes[1]) == plots.CORRECT_COLOUR
    assert [_spine_colour(ax) for ax in fig.axes[4:]] == [plots.WRONG_COLOUR] * 2
    with pytest.raises(ValueError, match="k must be in 1..3"):
        plots.plot_retrieval_grid(res, [0], k=4)


def test_plot_history_panels_and_values():
    history = pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "loss": [2.0, 1.5, 1.0],
            "b_acc": [0.1, 0.3, 0.5],
            "lr": [0.03, 0.03, 0.009],
            "val_R@1": [0.25, 0.5, 0.75],
        }
    )
    fig = plots.plot_history(history)
    assert len(fig.axes) == 4
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [2.0, 1.5, 1.0])
    np.testing.assert_allclose(fig.axes[0].lines[0].get_xdata(), [1, 2, 3])  # 0-based -> 1-based
    assert fig.axes[2].yaxis.get_major_formatter()(0.05, 0) == "0.05"
    np.testing.assert_allclose(fig.axes[3].lines[0].get_ydata(), [25, 50, 75])  # percent
    assert fig.axes[3].get_ylabel() == "recall (%)"
    _has_text(fig)
    fig = plots.plot_history(history[["epoch", "loss"]])
    assert len(fig.axes) == 1
    with pytest.raises(KeyError, match="loss, b_acc, lr"):
        plots.plot_history(history[["epoch"]])
    with pytest.raises(ValueError, match="no rows"):
        plots.plot_history(history.iloc[:0])
    tiny = history.assign(**{"val_R@1": [0.4, 0.6, 0.9]})  # percent, all below 1
    fig = plots.plot_history(tiny, recall_unit="percent")
    np.testing.assert_allclose(fig.axes[3].lines[0].get_ydata(), [0.4, 0.6, 0.9])
    with pytest.raises(ValueError, match=r"'val_R@1' has values above 1.*recall_unit='percent'"):
        plots.plot_history(history.assign(**{"val_R@1": [25.0, 50.0, 75.0]}))
    with pytest.raises(ValueError, match="recall_unit must be"):
        plots.plot_history(history, recall_unit="%")


def test_plot_recalls_percent_curves():
    fig = plots.plot_recalls({"a": {1: 0.5, 5: 0.75, 10: 1.0}, "b": {1: 0.25, 5: 0.5}})
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1, 5, 10])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [50, 75, 100])
    _has_text(fig)
    with pytest.raises(ValueError, match="outside"):
        plots.plot_recalls({"a": {1: 50.0}})


def test_plot_size_vs_recall_sorted_by_size():
    table = pd.DataFrame(
        {
            "descriptor_dim": [8192, 512, 4096],
            "Pitts30k R@1": [90.5, 89.1, 90.5],
            "MSLS R@1": [83.1, 82.6, 83.5],
            "MSLS R@5": [90.3, 90.0, 89.7],
            "MSLS R@10": [92.0, 91.0, 91.5],  # not an R@1 column, though it starts like one
        }
    )
    fig = plots.plot_size_vs_recall(table)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["Pitts30k R@1", "MSLS R@1"]
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [512, 4096, 8192])
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [82.6, 83.5, 83.1])
    _has_text(fig)
    with pytest.raises(KeyError, match="dim"):
        plots.plot_size_vs_recall(table, size_col="dim")
    assert ax.get_ylabel() == "recall@1 (%)" and ax.get_title() == "Descriptor size vs recall@1"
    ax = plots.plot_size_vs_recall(table, recall_cols=["MSLS R@5"]).axes[0]
    assert ax.get_ylabel() == "recall@5 (%)" and ax.get_title() == "Descriptor size vs recall@5"
    ax = plots.plot_size_vs_recall(table, recall_cols=["MSLS R@1", "MSLS R@10"]).axes[0]
    assert ax.get_ylabel() == "recall (%)"


def test_plot_compare_bars_and_time_panel():
    df = pd.DataFrame(
        {
            "aggregator": ["convap", "gem"],
            "R@1": [50.0, 40.0],
            "R@5": [70.0, 60.0],
            "R@10": [80.0, 75.0],
            "descriptor_dim": [2048, 256],
            "train_s": [30.0, 20.0],
        }
    )
    fig = plots.plot_compare(df)
    assert len(fig.axes) == 2
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [50.0, 40.0, 70.0, 60.0, 80.0, 75.0]
    np.testing.assert_allclose(fig.axes[1].collections[0].get_offsets(), [[30, 50], [20, 40]])
    assert "convap (2048-d)" in [t.get_text() for t in fig.axes[1].texts]
    _has_text(fig)
    assert plots.plot_compare(df, title="T")._suptitle.get_text() == "T"
    assert len(plots.plot_compare(df.drop(columns=["train_s"])).axes) == 1


def test_plot_compare_time_labels_do_not_overlap():
    """Notebook 05's numbers: netvlad and mixvpr sit close; their labels must not collide."""
    df = pd.DataFrame(
        {
            "aggregator": ["convap", "gem", "mixvpr", "netvlad", "avg"],
            "R@1": [76.2, 45.2, 78.6, 83.3, 54.8],
            "R@5": [88.1, 81.0, 85.7, 88.1, 69.0],
            "R@10": [88.1, 85.7, 88.1, 92.9, 81.0],
            "descriptor_dim": [512, 256, 512, 4096, 256],
            "train_s": [90.5, 73.2, 103.4, 96.5, 11.0],
        }
    )
    fig = plots.plot_compare(df)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = fig.axes[1].texts
    assert sorted(t.get_text() for t in texts) == sorted(
        f"{a} ({d}-d)" for a, d in zip(df["aggregator"], df["descriptor_dim"], strict=True)
    )
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)


def test_plot_compare_legend_hides_no_bar_or_label():
    """Bars up to 100 % with their value labels: the legend sits above all of them."""
    df = pd.DataFrame(
        {"aggregator": list("abcde"), "R@1": [100.0] * 5, "R@5": [100.0] * 5, "R@10": [100.0] * 5}
    )
    fig = plots.plot_compare(df)
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    for artist in [*ax.patches, *ax.texts]:
        assert not legend.overlaps(artist.get_window_extent(renderer)), artist
    with pytest.raises(KeyError, match="R@10"):
        plots.plot_compare(df.drop(columns=["R@10"]))


def test_save_figure_writes_png(tmp_path):
    fig = plots.plot_years(_df())
    out = plots.save_figure(fig, tmp_path / "figures" / "years.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert [p.name for p in out.parent.iterdir()] == ["years.png"]  # no temp file left
    with pytest.raises(ValueError, match=r"\.png"):
        plots.save_figure(fig, tmp_path / "years.jpg")


def test_plot_failure_distances_skips_nan():
    fig = plots.plot_failure_distances([30.0, 120.0, np.nan, 80.0], bins=4)
    ax = fig.axes[0]
    assert sum(_bar_heights(ax)) == 3 and "(3 of 4 failures have coordinates)" in ax.get_title()
    assert "(2 failures)" in plots.plot_failure_distances([30.0, 120.0]).axes[0].get_title()
    _has_text(fig)
    lines = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert [tuple(ln.get_xdata()) for ln in lines] == [(25.0, 25.0)]
    wide = plots.plot_failure_distances([30.0, 120.0], bins=4, threshold_m=100.0).axes[0]
    assert wide.get_legend().get_texts()[0].get_text() == "100 m threshold"
    assert [tuple(ln.get_xdata()) for ln in wide.lines] == [(100.0, 100.0)]
    assert not plots.plot_failure_distances([30.0], threshold_m=None).axes[0].lines
    fig = plots.plot_failure_distances([np.nan])
    assert not fig.axes[0].patches and "no failures" in fig.axes[0].texts[0].get_text()
