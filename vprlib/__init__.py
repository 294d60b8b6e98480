"""vprlib: supervised Visual Place Recognition on GSV-Cities, thin enough to copy.

Importing vprlib needs only torch, torchvision, numpy, pandas, pillow, faiss and
pytorch-metric-learning; pyarrow, when installed, reads the GSV-Cities CSVs ~2x faster; notebook
libraries are imported inside the functions that use them.
Note: `vprlib.evaluate` is the function; its module is reached with `from vprlib.evaluate import ...`.
"""

from .benchmarks import Benchmark, load_benchmark
from .evaluate import (
    EvalResults,
    evaluate,
    evaluate_descriptors,
    extract_descriptors,
    recall_at_k,
    search,
)
from .gsv_cities import (
    city_summary,
    filter_dates,
    filter_hemisphere,
    filter_min_images,
    gsv_filename,
    parse_gsv_filename,
    read_gsv_dataframes,
    scan_gsv_images,
)
from .gsv_dataset import GSVCitiesDataset
from .models import VPRModel, load_pretrained

__version__ = "0.1.0"

__all__ = [
    "Benchmark",
    "EvalResults",
    "city_summary",
    "evaluate_descriptors",
    "filter_dates",
    "filter_hemisphere",
    "filter_min_images",
    "GSVCitiesDataset",
    "VPRModel",
    "evaluate",
    "extract_descriptors",
    "fit",
    "gsv_filename",
    "load_benchmark",
    "load_pretrained",
    "parse_gsv_filename",
    "read_gsv_dataframes",
    "recall_at_k",
    "scan_gsv_images",
    "search",
]


def __getattr__(name: str):
    # `fit` is loaded on first use so that `python -m vprlib.train` does not import its own
    # module twice (runpy warns when the package import already loaded it).
    if name == "fit":
        from .train import fit

        return fit
    raise AttributeError(f"module 'vprlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"fit"})
