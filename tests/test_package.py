"""`import vprlib` needs only the core dependencies and exposes the public API of DESIGN.md."""

import re
import subprocess
import sys
import textwrap

NOTEBOOK_LIBS = ["folium", "ipywidgets", "matplotlib", "gdown", "tqdm", "IPython", "jupyterlab"]


def test_import_works_with_notebook_libraries_blocked():
    # A finder that refuses every notebook-only library: vprlib must import (and work) without them.
    code = textwrap.dedent(
        f"""
        import sys
        BLOCKED = {NOTEBOOK_LIBS!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"blocked for this test: {{name}}", name=name)
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import vprlib

        model = vprlib.VPRModel("resnet18", layers_to_crop=(4,), agg="gem")
        out = model(torch.zeros(2, 3, 64, 64))
        assert out.shape == (2, model.descriptor_dim)
        loaded = [m for m in BLOCKED if m in sys.modules]
        assert not loaded, loaded
        # the notebook functions say what they need and how to install it
        import pandas as pd
        df = pd.DataFrame({{"city_id": ["X"], "place": [1], "lat": [1.0], "lon": [2.0],
                           "year": [2020], "month": [1], "northdeg": [0]}})
        from vprlib import maps, plots, widgets
        for call, module, package in [
            (lambda: maps.cities_map(df), "folium", "folium"),
            (lambda: plots.plot_years(df), "matplotlib", "matplotlib"),
            (lambda: widgets.place_browser(df, "."), "ipywidgets", "ipywidgets"),
        ]:
            try:
                call()
            except ImportError as e:
                assert f"needs {{module}}" in str(e) and f"pip install {{package}}" in str(e), e
            else:
                raise AssertionError(f"no ImportError without {{module}}")
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_public_api_names():
    import vprlib

    for name in [
        "parse_gsv_filename",
        "gsv_filename",
        "read_gsv_dataframes",
        "GSVCitiesDataset",
        "VPRModel",
        "load_pretrained",
        "load_benchmark",
        "extract_descriptors",
        "search",
        "recall_at_k",
        "evaluate",
        "fit",
    ]:
        assert callable(getattr(vprlib, name)), name
    assert set(vprlib.__all__) <= set(dir(vprlib))


def test_colab_installs_the_notebook_libraries_without_jupyterlab(repo_root):
    """Colab runs its own Jupyter: the notebooks' install cell must not bring jupyterlab (and
    its jupyter-server) in, yet must install every notebook-only library vprlib imports."""
    import json
    import tomllib

    extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    colab = {re.split(r"[<>=\[]", d)[0] for d in extras["colab"]}
    assert "jupyterlab" not in colab
    assert {"folium", "ipywidgets", "matplotlib", "gdown", "tqdm"} <= colab
    assert "vprlib[colab]" in extras["notebooks"]
    for nb in sorted((repo_root / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        (setup,) = ["".join(c["source"]) for c in cells if "Colab only" in "".join(c["source"])]
        assert "/content/vprlib[colab]" in setup, nb.name


def test_needs_blames_only_a_missing_library():
    """`optional.needs` says "not installed: pip install X" only when X itself is absent; an
    old or broken install (or a missing dependency of X) is reported as such."""
    import pytest

    from vprlib.optional import needs

    with pytest.raises(
        ImportError, match=r"needs folium, which is not installed: pip install folium"
    ):
        with needs("f", "folium"):
            raise ModuleNotFoundError("No module named 'folium'", name="folium")
    with pytest.raises(
        ImportError, match=r"folium is installed but failed to import: cannot import"
    ):
        with needs("f", "folium"):
            raise ImportError("cannot import name 'X' from 'folium.plugins'", name="folium.plugins")
    with pytest.raises(ImportError, match=r"matplotlib is installed but failed to import"):
        with needs("f", "matplotlib"):
            raise ModuleNotFoundError("No module named 'dateutil'", name="dateutil")
    with pytest.raises(ImportError, match=r"pip install ipython"):
        with needs("f", "IPython"):
            raise ModuleNotFoundError("No module named 'IPython'", name="IPython")


def test_each_notebook_starts_with_a_self_contained_parameters_cell(repo_root):
    import nbformat

    notebooks = sorted((repo_root / "notebooks").glob("0*.ipynb"))
    assert len(notebooks) == 5
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert first_code.metadata.get("tags") == ["parameters"], path.name
        namespace: dict = {}
        exec(first_code.source, namespace)  # needs nothing defined by another cell
        assert {"DATA_ROOT", "GSV_ROOT", "BENCH_ROOT", "FIGURES"} <= set(namespace), path.name
