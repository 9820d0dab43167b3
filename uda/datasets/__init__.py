"""Person re-id datasets: parse a folder layout into records. Start with `load_dataset(name)`."""
from uda.datasets.base import ImageRecord, ReIDDataset
from uda.datasets.benchmarks import KNOWN_DATASETS, load_dataset

__all__ = ["ImageRecord", "KNOWN_DATASETS", "ReIDDataset", "load_dataset"]
