"""The notebook-only libraries (folium, matplotlib, ipywidgets, IPython, nbclient) are imported
inside the functions that use them; `needs` turns their absence into an error that says which
function needs what and how to install it (`import vprlib` never needs them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# import name -> pip package, where they differ
PIP_NAMES = {"IPython": "ipython"}


@contextlib.contextmanager
def needs(feature: str, *modules: str, extra: str = "colab") -> Iterator[None]:
    """Wrap the imports of notebook-only `modules`:
    `with needs("cities_map", "folium"): import folium`. Only their absence becomes the
    "not installed: pip install ..." error; any other ImportError (an old or broken install)
    is re-raised saying so. `extra`: the vprlib extra that installs them ("colab": maps, plots,
    widgets; "dev": nbclient)."""
    try:
        yield
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if isinstance(e, ModuleNotFoundError) and missing in modules:
            package = PIP_NAMES.get(missing, missing)
            raise ImportError(
                f"{feature} needs {missing}, which is not installed: pip install {package} "
                f"(or pip install 'vprlib[{extra}]')"
            ) from e
        raise ImportError(
            f"{feature}: {'/'.join(modules)} is installed but failed to import: {e}"
        ) from e
