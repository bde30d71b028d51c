"""Spatial feature maps and the ``stpn`` head on them (STPN).

- :mod:`~aggregator.maps.data`: padded batches of a store's map streams at their frame stride;
- :mod:`~aggregator.maps.train`: training an ``stpn`` run (:func:`train_map_run`);
- :mod:`~aggregator.maps.predict`: a trained ``stpn`` run for ``evaluate`` and the service;
- :mod:`~aggregator.maps.synthetic`: a task where the class is where in the frame motion happens.
"""

from aggregator.maps.data import MapDataset, map_loader, pad_maps
from aggregator.maps.predict import MapRun
from aggregator.maps.train import train_map_run

__all__ = ["MapDataset", "MapRun", "map_loader", "pad_maps", "train_map_run"]
