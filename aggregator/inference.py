"""A model's outputs over many stored videos: from the node summaries (in memory or streamed from
the node cache, each cache block read once) or from padded frames. What training validates and
tests with, and what evaluating a run computes, so that both see the same numbers."""

from __future__ import annotations

import numpy as np
import torch

from aggregator.data import NodeTensors, frame_loader
from aggregator.heads import TwoStream, VideoModel
from aggregator.node_cache import NodeBlocks
from storage import FeatureStore

__all__ = ["predict_frames", "predict_nodes"]


@torch.no_grad()
def predict_nodes(
    model: VideoModel,
    data: NodeTensors | NodeBlocks,
    index: np.ndarray,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    per_stream: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Outputs ``[n, C]`` of the rows ``index`` (and each stream's own logits when asked).
    Streamed data is read in store order (each cache block once), the outputs put back."""
    model.eval()
    out: list[torch.Tensor] = []
    streams_out: dict[str, list[torch.Tensor]] = {}
    order = data.store_order(index) if isinstance(data, NodeBlocks) else None
    rows = np.asarray(index) if order is None else np.asarray(index)[order]
    for nodes, _, _ in data.batches(rows, batch_size, dtype=dtype, device=device):
        out.append(model.forward_nodes(nodes).float().cpu())
        if per_stream and isinstance(model, TwoStream):
            for s, v in model.stream_logits(nodes).items():
                streams_out.setdefault(s, []).append(v.float().cpu())
    c = model.out_features
    logits = torch.cat(out).numpy() if out else np.zeros((0, c), dtype=np.float32)
    per = {s: torch.cat(v).numpy() for s, v in streams_out.items()}
    if order is not None:
        logits, per = _unsort(logits, order), {s: _unsort(v, order) for s, v in per.items()}
    return logits, per


def _unsort(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows computed in the order ``order`` put back in the original order."""
    out = np.empty_like(values)
    out[order] = values
    return out


@torch.no_grad()
def predict_frames(
    model: VideoModel, store: FeatureStore, video_ids: list[str], device: torch.device
) -> np.ndarray:
    """Outputs ``[n, C]`` of videos read as padded frames."""
    model.eval()
    streams = list(model.input_specs)
    out = []
    for batch in frame_loader(store, video_ids, streams, batch_size=32):
        feats = {s: t.to(device) for s, t in batch.features.items()}
        out.append(model(feats, batch.lengths.to(device)).float().cpu())
    return torch.cat(out).numpy()
