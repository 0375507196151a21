"""Shared, method-agnostic utilities for the deep anomaly detection book.

Everything method-specific (models, losses, scores) lives in the notebooks.
"""

from nbutils.config import PROJECT_ROOT, data_dir, get_device, seed_everything
from nbutils.data import DATASETS, OneClassSplit, load_one_class

__all__ = [
    "DATASETS",
    "PROJECT_ROOT",
    "OneClassSplit",
    "data_dir",
    "get_device",
    "load_one_class",
    "seed_everything",
]
