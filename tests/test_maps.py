"""Folium maps: the rendered HTML holds the right coordinates, counts and JS layers."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from vprlib import maps


def _df() -> pd.DataFrame:
    """Two cities: Paris with 3 places (4, 5, 6 images), Oslo with 1 place (4 images)."""
    rows = []
    spec = [("PRS", 0, 4, 48.85, 2.35), ("PRS", 1, 5, 48.86, 2.36), ("PRS", 2, 6, 48.87, 2.30)]
    spec += [("OSL", 100000, 4, 59.91, 10.75)]
    for city, place, n, lat, lon in spec:
        for j in range(n):
            rows.append(
                dict(
                    city_id=city,
                    place=place,
                    lat=lat,
                    lon=lon,
                    year=2015 + j % 3,
                    month=1 + j,
                    northdeg=90 * j,
                    panoid=f"p{place}_{j}",
                )
            )
    return pd.DataFrame(rows)


def _render(m) -> str:
    return m.get_root().render()


def test_cities_map_one_circle_per_city_with_counts():
    html = _render(maps.cities_map(_df()))
    assert html.count("L.circleMarker(") == 2
    assert "places: 3" in html and "images: 15" in html  # Paris
    assert "places: 1" in html and "images: 4" in html  # Oslo
    assert "59.91" in html and "10.75" in html
    # Paris centre = mean of its place positions (not of its images, not the first place)
    table = maps._city_table(_df()).set_index("city_id")
    want = [np.mean([48.85, 48.86, 48.87]), np.mean([2.35, 2.36, 2.30])]
    assert table.loc["PRS", ["lat", "lon"]].tolist() == pytest.approx(want)
    drawn = re.findall(r"L\.circleMarker\(\s*\[([-\d.]+), ([-\d.]+)\]", html)
    assert [float(x) for x in drawn[1]] == pytest.approx(want, abs=1e-6)


def test_city_map_passes_places_as_one_js_array():
    df = _df()
    html = _render(maps.city_map(df, "PRS"))
    assert "markerClusterGroup" in html and "leaflet.markercluster" in html
    assert "L.heatLayer(" in html and "leaflet_heat" in html
    assert "L.control.layers" in html and "PRS: 3 places" in html
    heat = json.loads(re.search(r"L\.heatLayer\(\s*(\[\[.*?\]\])", html, re.S).group(1))
    assert sorted(map(tuple, heat)) == [(48.85, 2.35), (48.86, 2.36), (48.87, 2.3)]
    data = json.loads(re.search(r"var data = (\[.*?\]\]);", html).group(1))
    assert sorted(row[2] for row in data) == [0, 1, 2]
    assert {row[2]: row[3] for row in data} == {0: 4, 1: 5, 2: 6}
    assert {row[2]: (row[0], row[1]) for row in data}[2] == (48.87, 2.30)
    # No HTML marker per place: only the one L.marker inside the JS callback.
    assert html.count("L.marker(") == 1 and "L.circleMarker(" not in html
    assert "OSL" not in html


def test_city_map_scales_to_many_places():
    n = 20000
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "city_id": "London",
            "place": np.arange(n),
            "lat": 51.5 + rng.normal(0, 0.05, n),
            "lon": -0.1 + rng.normal(0, 0.05, n),
        }
    )
    html = _render(maps.city_map(df, "London"))
    data = json.loads(re.search(r"var data = (\[.*?\]\]);", html).group(1))
    assert len(data) == n
    assert html.count("L.marker(") == 1


def test_city_map_unknown_city_names_known_ones():
    with pytest.raises(KeyError, match="Rome.*OSL"):
        maps.city_map(_df(), "Rome")


def test_place_map_markers_and_heading_lines():
    df = _df()
    html = _render(maps.place_map(df, 0))
    assert html.count("L.circleMarker(") == 4
    assert html.count("L.polyline(") == 4
    assert "heading 90&deg;" in html and "heading 270&deg;" in html
    # heading 90 (east): the line ends east of the image, same latitude
    lat, lon = maps._heading_end(48.85, 2.35, 90, 15.0)
    assert lat == pytest.approx(48.85) and lon > 2.35
    east_m = (lon - 2.35) * 111_320 * np.cos(np.radians(48.85))
    assert east_m == pytest.approx(15.0, rel=1e-6)
    lat, lon = maps._heading_end(48.85, 2.35, 360 + 180, 10.0)  # northdeg above 360
    assert lat < 48.85 and lon == pytest.approx(2.35)
    with pytest.raises(KeyError, match="place == 7"):
        maps.place_map(df, 7)


def test_retrieval_map_colours_follow_correct():
    q = (45.0, 7.0)
    db = [[45.0001, 7.0], [45.01, 7.0], [45.0, 7.0002]]
    html = _render(maps.retrieval_map(q, db, [True, False, True]))
    assert html.count('"color": "green"') == 4  # 2 markers + 2 lines
    assert html.count('"color": "red"') == 2
    assert "45.01" in html and "rank 2: wrong" in html
    assert "1112 m from query" in html  # 0.01 deg of latitude
    with pytest.raises(ValueError, match="3 database positions but 2"):
        maps.retrieval_map(q, db, [True, False])


def test_rows_without_coordinates_are_named_and_one_point_has_an_area():
    df = _df()
    df.loc[df["place"] == 1, "lat"] = np.nan
    for draw in (
        maps.cities_map,
        lambda d: maps.city_map(d, "PRS"),
        lambda d: maps.place_map(d, 1),
    ):
        with pytest.raises(ValueError, match=r"5 rows have no lat/lon \(NaN\), in places \[1\]"):
            draw(df)
    # a bad row in another city or place does not stop this one's map
    assert "59.91" in _render(maps.city_map(df, "OSL"))
    assert "48.87" in _render(maps.place_map(df, 2))
    html = _render(maps.city_map(_df(), "OSL"))  # one place: the view must not be a point
    (south, west), (north, east) = json.loads(
        re.search(r"fitBounds\(\s*(\[\[.*?\]\])", html, re.S)[1]
    )
    assert north > south and east > west
