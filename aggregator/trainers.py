"""The one entry of ``framepool train``: a head's config class, and its trainer.

Every head is trained from one frozen config (:mod:`aggregator.train_config`): the deep heads
from :class:`TrainConfig` by :func:`aggregator.train.train_run`, the heads that read spatial map
streams from :class:`MapTrainConfig` by :func:`aggregator.maps.train.train_map_run`, the ``svm``
from :class:`aggregator.svm.config.SVMConfig` by :func:`aggregator.svm.run.train_svm`. The
trainers are imported on first use, so that choosing a config loads none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aggregator.rundir import read_config
from aggregator.streams import MAP_HEADS
from aggregator.svm.config import SVMConfig
from aggregator.train_config import BaseTrainConfig, MapTrainConfig, TrainConfig

__all__ = ["config_class", "config_of", "retrain", "train"]


def config_class(head: str) -> type[TrainConfig] | type[MapTrainConfig] | type[SVMConfig]:
    """The config class of ``head``'s trainer."""
    if head == "svm":
        return SVMConfig
    return MapTrainConfig if head in MAP_HEADS else TrainConfig


def config_of(head: str, values: Mapping[str, Any]) -> TrainConfig | MapTrainConfig | SVMConfig:
    """``head``'s config from ``train_args``-shaped ``values`` (unknown keys are an error)."""
    return config_class(head).from_dict({**values, "head": head})


def train(
    store_path: str | Path,
    out_dir: str | Path,
    config: BaseTrainConfig | None = None,
    *,
    make_plots: bool = True,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Train the head of ``config`` (or of ``options``: ``train(store, out, head="stpn",
    epochs=5)``) on the store's features and write the run directory ``out_dir``; returns the
    metrics written to ``metrics.json``."""
    if config is None:
        config = config_of(str(options.pop("head", TrainConfig.head)), options)
    elif options:
        config = config.replace(**options)
    if isinstance(config, MapTrainConfig):
        from aggregator.maps.train import train_map_run

        return train_map_run(store_path, out_dir, config, make_plots=make_plots)
    if isinstance(config, SVMConfig):  # writes its plots whatever make_plots says
        from aggregator.svm.run import train_svm

        return train_svm(store_path, out_dir, config)
    if isinstance(config, TrainConfig):
        from aggregator.train import train_run

        return train_run(store_path, out_dir, config, make_plots=make_plots, progress=progress)
    raise TypeError(f"no trainer takes a {type(config).__name__} (head {config.head!r})")


def retrain(
    run_dir: str | Path, out_dir: str | Path, *, store_path: str | Path | None = None
) -> dict[str, Any]:
    """Train again from a run's ``config.json`` (same head, streams, splits, options and seed)
    into ``out_dir``; ``store_path`` overrides the recorded store location."""
    recorded = read_config(run_dir)
    config = config_of(recorded["head"], recorded["train_args"])
    return train(store_path or recorded["store"], out_dir, config)
