"""Folium maps of GSV-Cities and of retrieval results.

The maps take the DataFrame of `read_gsv_dataframes` (columns city_id, place, lat, lon, year,
month, northdeg, ...). folium is imported inside each function so `import vprlib` never needs it.
Large cities stay responsive because places go to the browser as one JavaScript array
(FastMarkerCluster) instead of one HTML marker per place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .gsv_cities import place_centres
from .optional import needs
from .plots import _require_columns

# Rounding coordinates to 6 decimals (~0.1 m) keeps the HTML small without moving any point.
_DECIMALS = 6


def _require_coordinates(df: pd.DataFrame, fn: str) -> None:
    """A map cannot place a row without lat/lon: name the places instead of folium's error."""
    missing = df["lat"].isna() | df["lon"].isna()
    if missing.any():
        places = df.loc[missing, "place"].unique().tolist()
        raise ValueError(
            f"{fn}: {int(missing.sum())} rows have no lat/lon (NaN), in places {places[:5]}; "
            "drop them first (df.dropna(subset=['lat', 'lon']))"
        )


def _city_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per city: places, images and centre (mean of its place positions)."""
    _require_columns(df, ["city_id", "place", "lat", "lon"], "cities_map")
    _require_coordinates(df, "cities_map")
    per_city = (
        place_centres(df)
        .groupby("city_id")
        .agg(
            places=("lat", "size"),
            images=("images", "sum"),
            lat=("lat", "mean"),
            lon=("lon", "mean"),
        )
    )
    return per_city.reset_index()[["city_id", "places", "images", "lat", "lon"]]


def cities_map(df: pd.DataFrame, max_radius_px: float = 30.0):
    """World map with one circle per city, its area proportional to the number of places."""
    with needs("vprlib.maps.cities_map", "folium"):
        import folium

    table = _city_table(df)
    if table.empty:
        raise ValueError("cities_map: the DataFrame has no rows")
    m = folium.Map(location=[20.0, 0.0], zoom_start=2)
    biggest = table["places"].max()
    for row in table.itertuples(index=False):
        radius = max(3.0, max_radius_px * math.sqrt(row.places / biggest))
        popup = f"<b>{row.city_id}</b><br>places: {row.places}<br>images: {row.images}"
        folium.CircleMarker(
            location=[round(row.lat, _DECIMALS), round(row.lon, _DECIMALS)],
            radius=radius,
            popup=folium.Popup(popup, max_width=250),
            tooltip=f"{row.city_id}: {row.places} places",
            color="#1f77b4",
            fill=True,
            fill_opacity=0.5,
        ).add_to(m)
    m.fit_bounds(_bounds(table[["lat", "lon"]].to_numpy()))
    return m


# Each FastMarkerCluster row is [lat, lon, place, images]; the marker and its popup are built in
# the browser. Plain L.marker: the kind Leaflet.markercluster is made for.
_PLACE_CALLBACK = """function (row) {
    var marker = L.marker(new L.LatLng(row[0], row[1]));
    marker.bindPopup('place ' + row[2] + '<br>images: ' + row[3]);
    return marker;
}"""


def city_map(df: pd.DataFrame, city: str):
    """One city's places: clustered markers (FastMarkerCluster) + a density heat map layer."""
    with needs("vprlib.maps.city_map", "folium"):
        import folium
        from folium.plugins import FastMarkerCluster, HeatMap

    _require_columns(df, ["city_id", "place", "lat", "lon"], "city_map")
    sub = df[df["city_id"] == city]
    if sub.empty:
        known = sorted(df["city_id"].unique().tolist())
        raise KeyError(f"city_map: no rows with city_id == {city!r}; known cities: {known}")
    _require_coordinates(sub, "city_map")  # this city's rows: a bad row elsewhere is no matter
    places = place_centres(sub).reset_index()
    lat = places["lat"].round(_DECIMALS).to_numpy()
    lon = places["lon"].round(_DECIMALS).to_numpy()
    m = folium.Map(location=[float(lat.mean()), float(lon.mean())], zoom_start=12)
    rows = [
        [float(a), float(b), int(p), int(n)]
        for a, b, p, n in zip(lat, lon, places["place"], places["images"], strict=True)
    ]
    FastMarkerCluster(rows, callback=_PLACE_CALLBACK, name=f"{city}: {len(rows)} places").add_to(m)
    HeatMap(
        np.column_stack([lat, lon]).tolist(), name="place density", radius=12, show=False
    ).add_to(m)
    folium.LayerControl(collapsed=False).add_to(m)
    m.fit_bounds(_bounds(np.column_stack([lat, lon])))
    return m


def _heading_end(lat: float, lon: float, heading_deg: float, length_m: float) -> list[float]:
    """Point `length_m` metres from (lat, lon) towards compass heading (0 = north, clockwise)."""
    rad = math.radians(heading_deg % 360)
    dlat = length_m * math.cos(rad) / 111_320.0
    dlon = length_m * math.sin(rad) / (111_320.0 * max(math.cos(math.radians(lat)), 1e-6))
    return [lat + dlat, lon + dlon]


def place_map(df: pd.DataFrame, place: int, arrow_m: float = 15.0):
    """One place: a marker per image (date, heading) and a line pointing where the camera looked."""
    with needs("vprlib.maps.place_map", "folium"):
        import folium

    _require_columns(df, ["place", "lat", "lon", "year", "month", "northdeg"], "place_map")
    sub = df[df["place"] == place].sort_values(["year", "month"])
    if sub.empty:
        raise KeyError(f"place_map: no rows with place == {place!r}")
    _require_coordinates(sub, "place_map")
    m = folium.Map(location=[float(sub["lat"].mean()), float(sub["lon"].mean())], zoom_start=19)
    for row in sub.itertuples(index=False):
        lat, lon = round(float(row.lat), _DECIMALS), round(float(row.lon), _DECIMALS)
        heading = int(row.northdeg) % 360
        text = f"{row.year:04d}-{row.month:02d}, heading {heading}&deg;"
        folium.CircleMarker([lat, lon], radius=6, color="#d62728", fill=True, popup=text).add_to(m)
        folium.PolyLine(
            [[lat, lon], _heading_end(lat, lon, heading, arrow_m)], color="#d62728", weight=3
        ).add_to(m)
    pts = sub[["lat", "lon"]].to_numpy(dtype=float)
    m.fit_bounds(_bounds(pts, pad_deg=0.0003))
    return m


def retrieval_map(
    query_latlon: Sequence[float],
    db_latlon_topk: np.ndarray | Sequence[Sequence[float]],
    correct: Sequence[bool],
):
    """Query (blue) and its top-K database matches, green if a true positive, red if not."""
    with needs("vprlib.maps.retrieval_map", "folium"):
        import folium

    q = np.asarray(query_latlon, dtype=float).reshape(-1)
    db = np.asarray(db_latlon_topk, dtype=float).reshape(-1, 2)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if q.shape != (2,):
        raise ValueError(f"retrieval_map: query_latlon must be (lat, lon), got shape {q.shape}")
    if len(db) != len(correct):
        raise ValueError(
            f"retrieval_map: {len(db)} database positions but {len(correct)} correct flags"
        )
    m = folium.Map(location=q.tolist(), zoom_start=17)
    for rank, (pos, ok) in enumerate(zip(db, correct, strict=True), start=1):
        colour = "green" if ok else "red"
        dist = _haversine_m(q, pos)
        folium.PolyLine([q.tolist(), pos.tolist()], color=colour, weight=2, opacity=0.6).add_to(m)
        folium.CircleMarker(
            pos.tolist(),
            radius=7,
            color=colour,
            fill=True,
            fill_opacity=0.8,
            popup=f"rank {rank}: {'correct' if ok else 'wrong'}, {dist:.0f} m from query",
            tooltip=f"#{rank}",
        ).add_to(m)
    folium.Marker(q.tolist(), popup="query", icon=folium.Icon(color="blue")).add_to(m)
    m.fit_bounds(_bounds(np.vstack([q[None], db]), pad_deg=0.0005))
    return m


def _haversine_m(a: np.ndarray, b: np.ndarray) -> float:
    """Great-circle distance in metres between two (lat, lon) points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6_371_000.0 * math.asin(math.sqrt(h))


def _bounds(points: np.ndarray, pad_deg: float = 0.0005) -> list[list[float]]:
    """[[south, west], [north, east]] around points, padded so one point still has an area."""
    pts = np.asarray(points, dtype=float)
    lo = pts.min(axis=0) - pad_deg
    hi = pts.max(axis=0) + pad_deg
    return [[float(lo[0]), float(lo[1])], [float(hi[0]), float(hi[1])]]
