"""Spatial feature maps and the ``stpn`` head on them (STPN).

- :mod:`~aggregator.maps.data`: padded batches of a store's map streams at their frame stride;
- :mod:`~aggregator.maps.train`: training an ``stpn`` run (:func:`train_map_run`);
- :mod:`~aggregator.maps.predict`: a trained ``stpn`` run for ``evaluate`` and the service;
- :mod:`~aggregator.maps.synthetic`: a task where the class is where in the frame motion happens.

The trainer is imported on first use, so that loading a run for serving does not load it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from aggregator.maps.data import MapDataset, map_loader, pad_maps
from aggregator.maps.predict import MapRun

if TYPE_CHECKING:
    from aggregator.maps.train import train_map_run

__all__ = ["MapDataset", "MapRun", "map_loader", "pad_maps", "train_map_run"]


def __getattr__(name: str) -> Any:
    if name == "train_map_run":
        return importlib.import_module("aggregator.maps.train").train_map_run
    raise AttributeError(f"module 'aggregator.maps' has no attribute {name!r}")
