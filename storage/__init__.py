"""The Zarr feature store. The only package here that imports zarr; depends on nothing else here."""

from storage.ids import assign_video_ids, safe_video_id
from storage.index import IndexTable
from storage.layout import CorruptVideoError
from storage.root import SCHEMA_VERSION
from storage.splits import SPLIT_FORMATS, parse_splits
from storage.store import FeatureStore
from storage.times import StreamTimes

__all__ = [
    "SCHEMA_VERSION",
    "SPLIT_FORMATS",
    "CorruptVideoError",
    "FeatureStore",
    "IndexTable",
    "StreamTimes",
    "assign_video_ids",
    "parse_splits",
    "safe_video_id",
]
