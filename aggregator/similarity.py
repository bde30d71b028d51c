"""Similar-video search: a faiss index of the training videos' video-level embeddings.

The index is exact (``IndexFlatIP``) over L2-normalised embeddings, so the inner product is the
cosine similarity and the reported distance is ``1 - cosine`` (0 for the same direction, 2 for the
opposite one). Cosine rather than Euclidean distance because what a head's embedding means is its
direction: heads scale their pooled representation very differently (batch norm, beta-weighted
node sums, concatenations of projected nodes), and a fixed distance range lets a caller read a
distance without knowing the head. Exact search rather than an approximate index because a
training set is at most tens of thousands of videos, where a flat scan takes milliseconds and
never misses a neighbour.

A run directory holds the index as ``index.faiss`` (faiss' own binary format, no pickle) and
``index_ids.json`` (video ids and labels row by row, the metric, the split and the store it was
built from).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from aggregator.predictor import Predictor
from storage import FeatureStore

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "index_ids.json"
METRIC = "cosine"
_EPS = 1e-12


@dataclass(frozen=True)
class Neighbour:
    """One search hit: a training video, its label, and its cosine distance to the query."""

    video_id: str
    label: str | None
    distance: float


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (``[n, e]`` or ``[e]``) scaled to unit L2 norm (float32); zero rows stay 0."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim not in (1, 2):
        raise ValueError(f"expected an embedding [e] or a matrix [n, e], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, _EPS), dtype=np.float32)


@dataclass
class SimilarityIndex:
    """Exact cosine search over the embeddings of ``video_ids`` (row i is ``video_ids[i]``)."""

    index: faiss.Index
    video_ids: list[str]
    labels: list[str | None]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.index.ntotal != len(self.video_ids) or len(self.labels) != len(self.video_ids):
            raise ValueError(
                f"index holds {self.index.ntotal} vectors but {len(self.video_ids)} video ids and "
                f"{len(self.labels)} labels were given"
            )
        self._rows = {v: i for i, v in enumerate(self.video_ids)}
        if len(self._rows) != len(self.video_ids):
            raise ValueError("video ids in a similarity index must be unique")

    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        video_ids: Sequence[str],
        labels: Sequence[str | None],
        meta: Mapping[str, Any] | None = None,
    ) -> SimilarityIndex:
        """Index ``embeddings`` ``[n, e]`` (any scale; they are L2-normalised here)."""
        x = normalize(embeddings)
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"expected embeddings [n, e] with n >= 1, got shape {x.shape}")
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return cls(index, list(video_ids), list(labels), {**dict(meta or {}), "metric": METRIC})

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._rows

    def vector(self, video_id: str) -> np.ndarray:
        """The stored (normalised) embedding of an indexed video."""
        if video_id not in self._rows:
            raise KeyError(f"video {video_id!r} is not in the similarity index")
        return np.asarray(self.index.reconstruct(self._rows[video_id]), dtype=np.float32)

    def search(
        self, query: np.ndarray, k: int = 5, *, exclude: Sequence[str] = ()
    ) -> list[Neighbour]:
        """The ``k`` nearest indexed videos to one embedding ``[e]``, nearest first.

        Videos named in ``exclude`` are left out (the query video itself, when searching by id).
        Ties in distance keep the index order, so results are deterministic.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        q = normalize(query)
        if q.ndim != 1:
            raise ValueError(f"search takes one embedding [e], got shape {q.shape}")
        if q.shape[0] != self.dim:
            raise ValueError(
                f"query embedding has dimension {q.shape[0]}, the index has {self.dim}"
            )
        skip = set(exclude)
        want = min(len(self), k + len(skip))
        sims, rows = self.index.search(q[None, :], want)
        out: list[Neighbour] = []
        for sim, row in zip(sims[0], rows[0], strict=True):
            if row < 0:
                continue
            vid = self.video_ids[int(row)]
            if vid in skip:
                continue
            # 1 - cosine, clipped: rounding can push a self-match a hair below 0
            distance = float(min(max(1.0 - float(sim), 0.0), 2.0))
            out.append(Neighbour(vid, self.labels[int(row)], distance))
            if len(out) == k:
                break
        return out

    def save(self, run_dir: str | Path) -> Path:
        """Write ``index.faiss`` and ``index_ids.json`` into ``run_dir`` (atomically each)."""
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=run, prefix=".index-", suffix=".faiss")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp_name)
            os.replace(tmp_name, run / INDEX_FILE)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        payload = {**self.meta, "dim": self.dim, "video_ids": self.video_ids, "labels": self.labels}
        tmp_ids = run / f".{IDS_FILE}.tmp"
        tmp_ids.write_text(json.dumps(payload, indent=1))
        os.replace(tmp_ids, run / IDS_FILE)
        return run / INDEX_FILE

    @classmethod
    def load(cls, run_dir: str | Path) -> SimilarityIndex:
        """Read the index saved in ``run_dir``; FileNotFoundError when there is none."""
        run = Path(run_dir)
        index_path, ids_path = run / INDEX_FILE, run / IDS_FILE
        for p in (index_path, ids_path):
            if not p.is_file():
                raise FileNotFoundError(f"no similarity index in {str(run)!r}: {p.name} missing")
        payload = json.loads(ids_path.read_text())
        index = faiss.read_index(str(index_path))
        if payload.get("metric", METRIC) != METRIC:
            raise ValueError(f"{str(ids_path)!r}: unknown metric {payload.get('metric')!r}")
        video_ids = [str(v) for v in payload["video_ids"]]
        labels = [None if v is None else str(v) for v in payload["labels"]]
        meta = {k: v for k, v in payload.items() if k not in ("video_ids", "labels", "dim")}
        return cls(index, video_ids, labels, meta)


def has_index(run_dir: str | Path) -> bool:
    run = Path(run_dir)
    return (run / INDEX_FILE).is_file() and (run / IDS_FILE).is_file()


def training_split(predictor: Predictor, default: str = "train") -> str:
    """The store split a run was trained on, as its config records it (else ``default``)."""
    config = getattr(predictor, "config", None)
    if isinstance(config, Mapping):
        splits = config.get("splits")
        if isinstance(splits, Mapping) and isinstance(splits.get("train"), str):
            return str(splits["train"])
        if isinstance(config.get("train_split"), str):
            return str(config["train_split"])
    return default


def embed_store_videos(
    predictor: Predictor,
    store: FeatureStore,
    video_ids: Sequence[str],
    *,
    use_cache: bool = True,
    batch_size: int = 256,
) -> np.ndarray:
    """``[n, e]`` float32 embeddings of stored videos.

    A torch run (one with ``input_specs`` and ``embed_nodes``) embeds batches of the summaries its
    head reads, taken from the store's node/interval caches (built once, already there after
    training): no frame features are read again. Any other predictor, or ``use_cache=False``,
    reads every video's frames and calls :meth:`Predictor.embed` once per video. The two agree
    up to the float16 rounding of the cache.
    """
    specs = getattr(predictor, "input_specs", None)
    embed_nodes = getattr(predictor, "embed_nodes", None)
    if use_cache and specs is not None and embed_nodes is not None:
        import torch

        from aggregator.data import load_node_data

        # the node cache the trainer loaded is reused (loaded once per process), and streamed
        # block by block when it exceeds the memory budget
        data = load_node_data(
            store,
            video_ids,
            np.zeros(len(video_ids), dtype=np.int64),
            specs,
            dtype=torch.float16,
            progress=False,
        )
        parts = []
        for nodes, _, _ in data.batches(np.arange(len(video_ids)), batch_size):
            parts.append(np.asarray(embed_nodes(nodes), dtype=np.float32))
        return np.concatenate(parts)
    rows = []
    for vid in video_ids:
        feats = {s: store.read(vid, s) for s in predictor.streams}
        rows.append(np.asarray(predictor.embed(feats), dtype=np.float32).reshape(-1))
    dims = {r.shape[0] for r in rows}
    if len(dims) > 1:
        raise ValueError(f"run {predictor.run_id!r} returned embeddings of several sizes: {dims}")
    return np.stack(rows)


def build_index(
    run_dir: str | Path,
    store_path: str | Path,
    split: str | None = "train",
    *,
    predictor: Predictor | None = None,
) -> SimilarityIndex:
    """Embed every complete video of ``split`` in the store with the run's head; save the index.

    ``split=None`` indexes every complete video. The run is loaded from ``run_dir`` unless a
    ``predictor`` (already loaded from it) is given. Returns the saved index.
    """
    if predictor is None:
        from aggregator.run_loader import load_run

        predictor = load_run(run_dir)
    store = FeatureStore.open(store_path, "r")
    video_ids = store.videos(split=split)
    if not video_ids:
        raise ValueError(f"store {str(store_path)!r} has no complete video in split {split!r}")
    held = set(store.extractor) | set(store.streams(video_ids[0]))
    missing = [s for s in predictor.streams if s not in held]
    if missing:
        raise ValueError(
            f"run {predictor.run_id!r} uses streams {missing} that store {str(store_path)!r} "
            f"does not hold (it has {sorted(held)})"
        )
    for stream in predictor.streams:
        if predictor.extractor.get(stream) != store.extractor.get(stream):
            raise ValueError(
                f"stream {stream!r} of store {str(store_path)!r} was extracted with "
                f"{store.extractor.get(stream)}, run {predictor.run_id!r} with "
                f"{predictor.extractor.get(stream)}"
            )
    embeddings = embed_store_videos(predictor, store, video_ids)
    table = store.index_table("complete")
    label_of = dict(zip(table.ids.tolist(), table.text["label"].tolist(), strict=True))
    labels = [label_of.get(v) for v in video_ids]
    meta = {
        "run_id": predictor.run_id,
        "store": str(store_path),
        "split": split,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    index = SimilarityIndex.from_embeddings(
        embeddings, video_ids, [None if lb is None else str(lb) for lb in labels], meta
    )
    index.save(run_dir)
    log.info("similarity index of %d %s videos written to %s", len(index), split, run_dir)
    return index
