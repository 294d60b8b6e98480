"""The notebook-only libraries (folium, matplotlib, ipywidgets, IPython, nbclient) are imported
inside the functions that use them; `needs` turns their absence into an error that says which
function needs what and how to install it (`import vprlib` never needs them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# import name -> pip package, where they differ
PIP_NAMES = {"IPython": "ipython", "PIL": "pillow"}


@contextlib.contextmanager
def needs(feature: str, extra: str = "colab") -> Iterator[None]:
    """Wrap the imports of a notebook-only library: `with needs("cities_map"): import folium`.
    `extra`: the vprlib extra that installs it ("colab": maps, plots, widgets; "dev": nbclient)."""
    try:
        yield
    except ImportError as e:
        if not e.name:  # not a missing module (e.g. a broken install): say what failed
            raise ImportError(f"{feature}: a notebook library failed to import: {e}") from e
        module = e.name.split(".")[0]
        package = PIP_NAMES.get(module, module)
        raise ImportError(
            f"{feature} needs {module}, which is not installed: pip install {package} "
            f"(or pip install 'vprlib[{extra}]')"
        ) from e
