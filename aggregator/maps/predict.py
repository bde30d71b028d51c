"""A trained map head (``stpn``) loaded for evaluation and serving, one video at a time.

:class:`MapRun` follows :class:`aggregator.predictor.Predictor`: its :attr:`streams` are the map
streams the head reads (``appearance_map``, ``motion_map``, ``[T', h, w, C]`` per video), and
:attr:`extractor_streams` adds the vector streams whose backbones compute them, which a service
needs to rebuild the extractor. The embedding used for similar-video search is the head's fused
representation (:meth:`aggregator.heads.SpatiotemporalPyramid.features`), as for the other heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.heads import SpatiotemporalPyramid, build_model
from aggregator.maps.data import MapDataset, map_loader
from aggregator.rundir import read_config, read_model_state
from aggregator.streams import MAP_SOURCES, MAP_STREAMS
from extractor.runtime import resolve_device


class MapRun:
    """A trained ``stpn`` run: ``predict_proba({appearance_map, motion_map}) -> [C]``."""

    def __init__(
        self, config: Mapping[str, Any], model: SpatiotemporalPyramid, device: torch.device
    ) -> None:
        self.config = dict(config)
        self.run_id: str = str(config.get("run_id", "run"))
        self.head: str = str(config["head"])
        self.class_names: list[str] = list(config["class_names"])
        self.streams: list[str] = list(MAP_STREAMS)
        self.extractor: dict[str, Any] = dict(config.get("extractor") or {})
        self.model = model.eval()
        self.device = device

    @property
    def extractor_streams(self) -> list[str]:
        """Every stream whose recorded configuration computing the maps needs (sources + maps)."""
        sources = [MAP_SOURCES[s] for s in self.streams]
        missing = [s for s in sources if self.extractor.get(s) is None]
        if missing:
            raise ValueError(
                f"run {self.run_id!r} does not record the extractor of streams {missing}, which "
                "compute its maps; retrain it with this version of framepool"
            )
        return [*sources, *self.streams]

    @classmethod
    def load(cls, run_dir: str | Path, *, device: str = "cpu") -> MapRun:
        config = read_config(run_dir)
        streams = list(config.get("streams") or [])
        if streams != list(MAP_STREAMS):
            raise ValueError(
                f"run {str(run_dir)!r}: head {config['head']!r} reads {list(MAP_STREAMS)}, "
                f"the run records streams {streams}"
            )
        model = build_model(
            config["head"],
            in_features=config["in_features"],
            num_classes=int(config["num_classes"]),
            head_kwargs=config.get("head_kwargs"),
        )
        assert isinstance(model, SpatiotemporalPyramid)
        model.load_state_dict(read_model_state(run_dir))
        dev = resolve_device(device)
        return cls(config, model.to(dev), dev)

    def _batch(self, features: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], Any]:
        x: dict[str, torch.Tensor] = {}
        for s in self.streams:
            if s not in features:
                raise KeyError(f"run {self.run_id!r} reads stream {s!r}; got {sorted(features)}")
            a = np.asarray(features[s])
            want = int(self.config["in_features"][s])
            if a.ndim != 4 or a.shape[-1] != want or a.shape[0] < 1:
                raise ValueError(
                    f"stream {s!r} must be a [T' >= 1, h, w, {want}] map, got shape {a.shape}"
                )
            x[s] = torch.from_numpy(a.astype(np.float32))[None].to(self.device)
        t = int(x[self.streams[0]].shape[1])
        return x, torch.tensor([t], device=self.device)

    @torch.no_grad()
    def predict_logits(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[C]`` logits of one video's maps ``{stream: [T', h, w, C]}``."""
        x, lengths = self._batch(features)
        return self.model(x, lengths)[0].float().cpu().numpy()

    def predict_proba(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[C]`` class probabilities of one video's maps."""
        logits = torch.from_numpy(self.predict_logits(features)).double()
        return torch.softmax(logits, dim=0).numpy()

    @torch.no_grad()
    def embed(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[out_dim]`` float32: the head's fused representation of the video (before the FC)."""
        x, lengths = self._batch(features)
        return self.model.features(x, lengths)[0].float().cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def attention(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[T', h, w]`` attention weights over the cells of every map frame."""
        x, lengths = self._batch(features)
        return self.model.attention_weights(x, lengths)[0].cpu().numpy()

    def beta(self) -> dict[str, list[list[float]]] | None:
        return None

    def fusion_weights(self) -> dict[str, float] | None:
        return None

    @torch.no_grad()
    def logits_of(self, data: MapDataset, *, batch_size: int = 16) -> np.ndarray:
        """``[n, C]`` float32 logits of every video of ``data`` (padded batches), in order."""
        self.model.eval()
        out = []
        for b in map_loader(data, batch_size=batch_size):
            x = {s: t.to(self.device) for s, t in b.features.items()}
            out.append(self.model(x, b.lengths.to(self.device)).float().cpu())
        return torch.cat(out).numpy()


@torch.no_grad()
def predict_maps(
    model: SpatiotemporalPyramid,
    data: MapDataset,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [n, C] float32, labels [n])`` of every video of ``data``, in order."""
    model.eval()
    logits, labels = [], []
    for b in map_loader(data, batch_size=batch_size):
        x = {s: t.to(device) for s, t in b.features.items()}
        logits.append(model(x, b.lengths.to(device)).float().cpu())
        labels.append(b.labels)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def is_map_run(config: Mapping[str, Any]) -> bool:
    """True for a run whose head reads the map streams."""
    return str(config.get("head")) == "stpn"


__all__ = ["MapRun", "is_map_run", "predict_maps"]
