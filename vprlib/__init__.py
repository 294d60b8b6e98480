"""vprlib: supervised Visual Place Recognition on GSV-Cities, thin enough to copy.

Importing vprlib needs only torch, torchvision, numpy, pandas, pillow, faiss and
pytorch-metric-learning; notebook libraries are imported inside the functions that use them.
"""

from .benchmarks import load_benchmark
from .evaluate import evaluate, extract_descriptors, recall_at_k, search
from .gsv_cities import (
    GSVCitiesDataset,
    gsv_filename,
    parse_gsv_filename,
    read_gsv_dataframes,
    scan_gsv_images,
)
from .models import VPRModel, load_pretrained
from .train import fit

__version__ = "0.1.0"

__all__ = [
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
