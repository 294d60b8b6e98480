"""ipywidgets browsers: GSV-Cities places and retrieval results.

Each browser is an `ipywidgets.VBox` that renders into an `Output` area by appending display
data (PNG figures, HTML tables, folium maps), so it builds and updates without a live frontend
(tests change the control values and read `box.output.outputs`). The controls are reachable as
`box.controls[name]`, the latest matplotlib figure as `box.last_figure`.
ipywidgets, IPython and matplotlib are imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import plots
from .optional import needs


def _show(output, *objects) -> None:
    """Replace the Output area's contents with `objects` (IPython display objects)."""
    output.outputs = ()
    for obj in objects:
        output.append_display_data(obj)


def _figure_image(fig):
    """A closed matplotlib figure as an IPython PNG image (no inline backend needed)."""
    with needs("vprlib.widgets", "matplotlib", "IPython"):
        import matplotlib.pyplot as plt
        from IPython.display import Image

    png = plots.figure_png(fig)
    plt.close(fig)
    return Image(data=png, format="png")


def _error_html(html_display, what: str, error: BaseException):
    """The error of a render, shown where the figure would be (as IPython's `HTML`
    `html_display`): a widget callback's exception would otherwise go to the log console,
    unseen, with the previous figure still shown."""
    import html

    message = html.escape(f"{type(error).__name__}: {error}")
    return html_display(f"<b style='color:#b00'>cannot show {what}:</b> <code>{message}</code>")


# ---------------------------------------------------------------- GSV-Cities places


def place_figure(df: pd.DataFrame, root: str | os.PathLike, place: int, max_images: int = 20):
    """One place's images in date order, each titled with date and heading."""
    with needs("vprlib.widgets.place_figure", "matplotlib"):
        import matplotlib.pyplot as plt

    rows = df[df["place"] == place].sort_values(["year", "month"])
    if rows.empty:
        raise KeyError(f"place_figure: no rows with place == {place!r}")
    rows = rows.head(max_images)
    cols = min(len(rows), 5)
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    with plots.closed_on_error(fig):
        for ax, row in zip(axes.flat, rows.itertuples(index=False), strict=False):
            ax.imshow(plots._load_rgb(Path(root) / row.path))
            ax.set_title(
                f"{row.year:04d}-{row.month:02d}  heading {int(row.northdeg) % 360}°", fontsize=8
            )
    city = rows["city_id"].iloc[0]
    fig.suptitle(f"{city}, place {place}: {len(rows)} images, oldest first")
    fig.tight_layout()
    return fig


def place_browser(df: pd.DataFrame, root: str | os.PathLike):
    """City dropdown -> place dropdown -> the place's images sorted by date, with metadata.

    `df` comes from `read_gsv_dataframes(root)` (needs city_id, place, year, month, northdeg,
    lat, lon, panoid, path); `root` is the GSV-Cities folder the `path` column is relative
    to. A place whose images cannot be shown (a missing file) shows the error instead.
    """
    with needs("vprlib.widgets.place_browser", "ipywidgets", "IPython"):
        import ipywidgets as W
        from IPython.display import HTML

    plots._require_columns(
        df,
        ["city_id", "place", "year", "month", "northdeg", "lat", "lon", "panoid", "path"],
        "place_browser",
    )
    if df.empty:
        raise ValueError("place_browser: the DataFrame has no rows")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"place_browser: image root {root} is not a folder")

    cities = sorted(df["city_id"].unique().tolist())
    city_dd = W.Dropdown(options=cities, value=cities[0], description="city")
    place_dd = W.Dropdown(description="place")
    output = W.Output()
    box = W.VBox([W.HBox([city_dd, place_dd]), output])
    box.controls = {"city": city_dd, "place": place_dd}
    box.output = output
    box.last_figure = None

    def place_options(city: str) -> list[tuple[str, int]]:
        sizes = df[df["city_id"] == city].groupby("place").size()
        return [(f"{p} ({n} images)", int(p)) for p, n in sizes.items()]

    def render(change=None) -> None:
        place = place_dd.value
        box.last_figure = None
        if place is None:
            _show(output, HTML("<i>no place selected</i>"))
            return
        try:
            fig = place_figure(df, root, place)
        except (OSError, ValueError) as e:  # a missing or unreadable image: say which
            _show(output, _error_html(HTML, f"place {place}", e))
            return
        box.last_figure = fig
        rows = df[df["place"] == place].sort_values(["year", "month"])
        table = rows[["year", "month", "northdeg", "lat", "lon", "panoid", "path"]]
        _show(output, _figure_image(fig), HTML(table.to_html(index=False)))

    def on_city(change=None) -> None:
        options = place_options(city_dd.value)
        # Setting options resets the value; render once after choosing the first place.
        place_dd.unobserve(render, names="value")
        place_dd.options = options
        place_dd.value = options[0][1]
        place_dd.observe(render, names="value")
        render()

    city_dd.observe(on_city, names="value")
    place_dd.observe(render, names="value")
    on_city()
    return box


# ---------------------------------------------------------------- retrieval results


def _first_hit_rank(correct_row: np.ndarray) -> int | None:
    hits = np.flatnonzero(correct_row)
    return int(hits[0]) + 1 if hits.size else None


def retrieval_browser(results, benchmark=None, k: int = 5):
    """Browse queries beside their top-K matches (green/red frames, distances) and a map.

    `results` is an EvalResults (predictions, distances, correct, query_paths, db_paths);
    `benchmark` (optional) supplies `query_latlon` / `db_latlon` for the folium map.
    Controls: query slider, K slider, "only failures" (queries whose top-1 is wrong). A query
    whose images cannot be shown (a missing file) shows the error instead.
    """
    with needs("vprlib.widgets.retrieval_browser", "ipywidgets", "IPython"):
        import ipywidgets as W
        from IPython.display import HTML

    from . import maps

    correct = np.asarray(results.correct, dtype=bool)
    n_query, kmax = correct.shape
    if n_query == 0:
        raise ValueError("retrieval_browser: the results hold no queries")
    if not 1 <= k <= kmax:
        raise ValueError(f"retrieval_browser: k must be in 1..{kmax}, got {k}")
    latlon = None
    if benchmark is not None and getattr(benchmark, "query_latlon", None) is not None:
        if getattr(benchmark, "db_latlon", None) is not None:
            latlon = (np.asarray(benchmark.query_latlon), np.asarray(benchmark.db_latlon))

    failures = np.flatnonzero(~correct[:, 0])
    all_queries = np.arange(n_query)
    query_sl = W.IntSlider(value=0, min=0, max=n_query - 1, description="query")
    k_sl = W.IntSlider(value=k, min=1, max=kmax, description="K")
    fail_tb = W.ToggleButton(value=False, description=f"only failures ({len(failures)})")
    info = W.HTML()
    output = W.Output()
    box = W.VBox([W.HBox([query_sl, k_sl, fail_tb]), info, output])
    box.controls = {"query": query_sl, "k": k_sl, "only_failures": fail_tb}
    box.output = output
    box.last_figure = None
    box.current_query = None

    def selected() -> np.ndarray:
        return failures if fail_tb.value else all_queries

    def render(change=None) -> None:
        chosen = selected()
        if len(chosen) == 0:
            box.current_query = None
            info.value = "<b>No failures:</b> every query's top-1 is a true positive."
            _show(output, HTML("<i>nothing to show</i>"))
            return
        q = int(chosen[min(query_sl.value, len(chosen) - 1)])
        kk = k_sl.value
        box.current_query = q
        box.last_figure = None
        preds = np.asarray(results.predictions[q, :kk])
        ok = correct[q, :kk]
        first = _first_hit_rank(correct[q])
        first_txt = f"first positive at rank {first}" if first else f"no positive in top-{kmax}"
        info.value = (
            f"query {q} ({query_sl.value + 1} of {len(chosen)} shown), "
            f"top-1 {'correct' if ok[0] else 'wrong'}, {first_txt}"
        )
        try:
            fig = plots.plot_retrieval(
                results.query_paths[q],
                [results.db_paths[i] for i in preds],
                ok,
                np.asarray(results.distances[q, :kk]),
                title=f"{results.benchmark}, query {q}: top-{kk} (green = positive, red = wrong)",
            )
        except (OSError, ValueError) as e:  # a missing or unreadable image: say which
            _show(output, _error_html(HTML, f"query {q}", e))
            return
        box.last_figure = fig
        shown = [_figure_image(fig)]
        if latlon is not None:
            shown.append(maps.retrieval_map(latlon[0][q], latlon[1][preds], ok))
        _show(output, *shown)

    def on_filter(change=None) -> None:
        query_sl.unobserve(render, names="value")
        query_sl.max = max(len(selected()) - 1, 0)
        query_sl.value = 0
        query_sl.observe(render, names="value")
        render()

    query_sl.observe(render, names="value")
    k_sl.observe(render, names="value")
    fail_tb.observe(on_filter, names="value")
    render()
    return box
