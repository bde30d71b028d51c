"""Load a trained run directory as a :class:`aggregator.predictor.Predictor`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.data import summaries_of
from aggregator.heads import NodeInput, VideoModel, build_model
from aggregator.heads.views import fusion_weights_of, model_betas
from aggregator.intervals import Intervals
from aggregator.predictor import Predictor
from aggregator.rundir import learned_fusion_rule, read_config, read_model_state
from extractor.runtime import resolve_device

__all__ = ["TorchRun", "load_run", "read_config"]


class TorchRun:
    """A trained torch head, ready for one video at a time (or node batches).

    Attributes follow the Predictor protocol: ``run_id``, ``head``, ``class_names``, ``streams``,
    ``extractor`` (the store's extractor config per stream, which inputs must match), plus
    ``model`` and ``input_specs`` (what each stream's head reads). Raw summaries go in: the
    model standardises them itself with the statistics it was trained with.
    """

    def __init__(self, config: Mapping[str, Any], model: VideoModel, device: torch.device) -> None:
        self.config = dict(config)
        self.run_id: str = str(config.get("run_id", "run"))
        self.head: str = str(config["head"])
        self.class_names: list[str] = list(config["class_names"])
        self.streams: list[str] = list(config["streams"])
        self.extractor: dict[str, Any] = dict(config.get("extractor") or {})
        self.model = model.eval()
        self.device = device
        self.input_specs: dict[str, Intervals] = dict(model.input_specs)

    @classmethod
    def load(cls, run_dir: str | Path, *, device: str = "cpu") -> TorchRun:
        config = read_config(run_dir)
        model = build_model(
            config["head"],
            in_features=config["in_features"],
            num_classes=int(config["num_classes"]),
            head_kwargs=config.get("head_kwargs"),
            fusion=config.get("fusion") or "learned",
            fusion_weights=config.get("fusion_weights"),
            standardize=bool(config.get("standardize", False)),
            learned_on=learned_fusion_rule(config),
        )
        model.load_state_dict(read_model_state(run_dir))
        dev = resolve_device(device)
        return cls(config, model.to(dev), dev)

    def summaries(self, features: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """``{stream: [1, M, d]}`` interval summaries of one video's ``{stream: [T, d]}`` frames."""
        for s in self.streams:
            if s in features:
                d = np.shape(features[s])[-1]
                expected = int(self.config["in_features"][s])
                if d != expected:
                    raise ValueError(
                        f"stream {s!r} has d={d}, this run was trained on d={expected}"
                    )
        nodes = summaries_of(features, self.input_specs)
        return {s: t.to(self.device) for s, t in nodes.items()}

    @torch.no_grad()
    def predict_proba_nodes(self, nodes: Mapping[str, NodeInput]) -> np.ndarray:
        """``[B, C]`` class probabilities of precomputed summaries ``{stream: [B, M, d]}``."""
        logits = self.model.forward_nodes({s: t.to(self.device) for s, t in nodes.items()})
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def predict_proba(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[C]`` class probabilities of one video (``{stream: [T, d]}`` frame features)."""
        return self.predict_proba_nodes(self.summaries(features))[0]

    @torch.no_grad()
    def embed_nodes(self, nodes: Mapping[str, NodeInput]) -> np.ndarray:
        """``[B, e]`` float32 embeddings of precomputed summaries."""
        feats = self.model.features({s: t.to(self.device) for s, t in nodes.items()})
        return feats.float().cpu().numpy().astype(np.float32)

    def embed(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[e]`` float32 video-level embedding: the head's pooled representation."""
        return self.embed_nodes(self.summaries(features))[0]

    def beta(self) -> dict[str, list[list[float]]] | None:
        """Learned node weights per stream, level by level (None when the head has none)."""
        return model_betas(self.model) or None

    def fusion_weights(self) -> dict[str, float] | None:
        return fusion_weights_of(self.model)


def load_run(run_dir: str | Path, *, device: str = "cpu") -> Predictor:
    """Load a run directory written by ``framepool train`` as a Predictor.

    Torch heads come back as :class:`TorchRun`; ``svm`` runs as
    ``aggregator.svm.predictor.SVMPredictor``; ``stpn`` runs as
    :class:`aggregator.maps.predict.MapRun`.
    """
    config = read_config(run_dir)
    if config["head"] == "stpn":  # reads the spatial map streams
        from aggregator.maps.predict import MapRun

        map_run: Predictor = MapRun.load(run_dir, device=device)
        return map_run
    if config["head"] == "svm":
        from aggregator.svm.predictor import SVMPredictor

        predictor: Predictor = SVMPredictor.load(run_dir)
        return predictor
    return TorchRun.load(run_dir, device=device)
