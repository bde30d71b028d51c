"""Similar-video search: a faiss index of the training videos' video-level embeddings.

Search is by cosine similarity over L2-normalised embeddings, so the inner product is the cosine
and the reported distance is ``1 - cosine`` (0 for the same direction, 2 for the opposite one).
Cosine rather than Euclidean distance because what a head's embedding means is its direction:
heads scale their pooled representation very differently (batch norm, beta-weighted node sums,
concatenations of projected nodes), and a fixed distance range lets a caller read a distance
without knowing the head.

The index is built block by block (a batch of embeddings is normalised and added, then dropped),
so no ``[n, e]`` matrix of every embedding exists, and it is held within a share of the memory
budget: exact (``Flat``) when it fits, else a compressed faiss index over the full embedding
(``HNSW32,SQ8`` or an IVF-PQ; :mod:`aggregator.faiss_index` plans, trains and configures it).
The index records its kind, factory string and parameters (``index`` in ``index_ids.json``).
Compressed kinds return approximate neighbours and distances (decoded codes), and
:meth:`SimilarityIndex.vector` returns a video's decoded vector.

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
import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from aggregator.faiss_index import (
    INDEX_SHARE,
    TRAIN_MIN_BYTES,
    TRAIN_SHARE,
    IndexPlan,
    configure_search,
    empty_index,
    index_matrix,
    normalize,
    plan_index,
    sample_rows,
)
from aggregator.predictor import Predictor
from aggregator.rerank import (
    CANDIDATES,
    VECTORS_FILE,
    VectorFile,
    open_vectors,
    rerank,
    write_vectors,
)
from storage import FeatureStore

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "index_ids.json"
METRIC = "cosine"

__all__ = [
    "IDS_FILE",
    "INDEX_FILE",
    "INDEX_SHARE",
    "METRIC",
    "TRAIN_MIN_BYTES",
    "TRAIN_SHARE",
    "IndexPlan",
    "Neighbour",
    "SimilarityIndex",
    "build_index",
    "configure_search",
    "embed_store_videos",
    "empty_index",
    "has_index",
    "index_matrix",
    "iter_store_embeddings",
    "normalize",
    "plan_index",
    "sample_rows",
    "training_split",
]


@dataclass(frozen=True)
class Neighbour:
    """One search hit: a training video, its label, and its cosine distance to the query."""

    video_id: str
    label: str | None
    distance: float


@dataclass
class SimilarityIndex:
    """Cosine search over the embeddings of ``video_ids`` (row i is ``video_ids[i]``)."""

    index: faiss.Index
    video_ids: list[str]
    labels: list[str | None]
    meta: dict[str, Any] = field(default_factory=dict)
    # the full normalised embeddings ``[n, e]`` (a memory map): a compressed index's candidates
    # are re-ranked by their exact similarity (:mod:`aggregator.rerank`)
    vectors: VectorFile | None = None

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

    def kind(self) -> dict[str, Any]:
        """``{kind, factory, params, bytes}`` as the index records them; an index written before
        the record existed reads as ``flat`` or as ``pca`` (its principal subspace) by its meta."""
        recorded = self.meta.get("index")
        if isinstance(recorded, Mapping):
            out = {k: recorded.get(k) for k in ("kind", "factory", "params")}
        elif self.meta.get("reduced_dim"):
            r = int(self.meta["reduced_dim"])
            out = {"kind": "pca", "factory": f"PCA{r},L2norm,Flat", "params": {"reduced_dim": r}}
        else:
            out = {"kind": "flat", "factory": "Flat", "params": {}}
        out["bytes"] = self.meta.get("index_bytes")
        rerank_record = self.meta.get("rerank")
        if isinstance(rerank_record, Mapping):
            out["rerank_candidates"] = rerank_record.get("candidates")
        return out

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._rows

    def vector(self, video_id: str) -> np.ndarray:
        """The stored (normalised) embedding of an indexed video."""
        if video_id not in self._rows:
            raise KeyError(f"video {video_id!r} is not in the similarity index")
        row = self._rows[video_id]
        if self.vectors is not None:
            return self.vectors.read(np.array([row]))[0]
        return np.asarray(self.index.reconstruct(row), dtype=np.float32)

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
        if self.vectors is None:
            found_sims, found_rows = (r[0] for r in self.index.search(q[None, :], want))
        else:  # a compressed index: its candidates in their exact order
            _, candidates = self.index.search(q[None, :], min(len(self), CANDIDATES * want))
            found_sims, found_rows = rerank(self.vectors, q, candidates[0])
        out: list[Neighbour] = []
        for sim, row in zip(found_sims, found_rows, strict=True):
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
        self.meta["index_bytes"] = (run / INDEX_FILE).stat().st_size
        payload = {
            **self.meta,
            "dim": self.dim,
            "video_ids": self.video_ids,
            "labels": self.labels,
        }
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
        recorded = meta.get("index")
        if isinstance(recorded, Mapping) and isinstance(recorded.get("params"), Mapping):
            configure_search(index, recorded["params"])
        vectors = None
        if meta.get("rerank"):
            if not (run / VECTORS_FILE).is_file():
                raise FileNotFoundError(
                    f"similarity index in {str(run)!r} re-ranks from {VECTORS_FILE}, which is "
                    "missing: rebuild it with `framepool index`"
                )
            vectors = open_vectors(run / VECTORS_FILE, len(video_ids), int(index.d))
        return cls(index, video_ids, labels, meta, vectors)


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


def iter_store_embeddings(
    predictor: Predictor,
    store: FeatureStore,
    video_ids: Sequence[str],
    *,
    use_cache: bool = True,
    batch_size: int = 256,
    budget: int | None = None,
) -> Generator[np.ndarray, None, None]:
    """``[b, e]`` float32 embeddings of ``video_ids``, in order, at most ``batch_size`` at a time.

    A torch run (one with ``input_specs`` and ``embed_nodes``) embeds batches of the summaries its
    head reads, taken from the store's node/interval caches (built once, already there after
    training; streamed block by block when they exceed the memory budget): no frame features are
    read again. Any other predictor, or ``use_cache=False``, reads every video's frames and calls
    :meth:`Predictor.embed` once per video. The two agree up to the float16 rounding of the cache.
    ``budget`` is the memory budget of the node data (default
    :func:`aggregator.node_cache.memory_budget`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    specs = getattr(predictor, "input_specs", None)
    embed_nodes = getattr(predictor, "embed_nodes", None)
    if use_cache and specs is not None and embed_nodes is not None:
        import torch

        from aggregator.data import load_node_data
        from aggregator.heads import VideoModel
        from aggregator.heads.views import pyramid_leaf_streams

        # the node cache the trainer loaded is reused (loaded once per process), and streamed
        # block by block when it exceeds the memory budget; a temporal pyramid reads its leaves
        # only (half the nodes), as in training
        model = getattr(predictor, "model", None)
        data = load_node_data(
            store,
            video_ids,
            np.zeros(len(video_ids), dtype=np.int64),
            specs,
            dtype=torch.float16,
            leaves=pyramid_leaf_streams(model) if isinstance(model, VideoModel) else (),
            progress=False,
            budget=budget,
        )
        done = 0
        for nodes, _, at in data.batches(np.arange(len(video_ids)), batch_size):
            got = np.asarray(at)
            if len(got) == 0 or int(got[0]) != done or int(got[-1]) != done + len(got) - 1:
                raise RuntimeError(f"node batches left index order at row {done}")
            done += len(got)
            yield np.asarray(embed_nodes(nodes), dtype=np.float32)
        return
    pending: list[np.ndarray] = []
    dim: int | None = None
    for vid in video_ids:
        feats = {s: store.read(vid, s) for s in predictor.streams}
        row = np.asarray(predictor.embed(feats), dtype=np.float32).reshape(-1)
        if dim is not None and row.shape[0] != dim:
            raise ValueError(
                f"run {predictor.run_id!r} returned embeddings of several sizes: "
                f"{dim} and {row.shape[0]} (video {vid!r})"
            )
        dim = row.shape[0]
        pending.append(row)
        if len(pending) == batch_size:
            yield np.stack(pending)
            pending = []
    if pending:
        yield np.stack(pending)


def embed_store_videos(
    predictor: Predictor,
    store: FeatureStore,
    video_ids: Sequence[str],
    *,
    use_cache: bool = True,
    batch_size: int = 256,
) -> np.ndarray:
    """``[n, e]`` float32 embeddings of stored videos, whole (see :func:`iter_store_embeddings`;
    :func:`build_index` never holds this matrix)."""
    blocks = iter_store_embeddings(
        predictor, store, video_ids, use_cache=use_cache, batch_size=batch_size
    )
    first = next(blocks, None)
    if first is None:
        raise ValueError("no video to embed")
    out = np.empty((len(video_ids), first.shape[1]), dtype=np.float32)
    out[: len(first)] = first
    done = len(first)
    for block in blocks:
        out[done : done + len(block)] = block
        done += len(block)
    return out


def build_index(
    run_dir: str | Path,
    store_path: str | Path,
    split: str | None = "train",
    *,
    predictor: Predictor | None = None,
    budget: int | None = None,
    batch_size: int = 256,
) -> SimilarityIndex:
    """Embed every complete video of ``split`` in the store with the run's head; save the index.

    ``split=None`` indexes every complete video. The run is loaded from ``run_dir`` unless a
    ``predictor`` (already loaded from it) is given. Embeddings are added ``batch_size`` at a
    time, and the index is held within a quarter of ``budget`` (default
    :func:`aggregator.node_cache.memory_budget`): exact when it fits, else compressed
    (:func:`plan_index`). Returns the saved index.
    """
    t0 = time.perf_counter()
    if predictor is None:
        from aggregator.run_loader import load_run

        predictor = load_run(run_dir)
    store = FeatureStore.open(store_path, "r")
    video_ids = store.videos(split=split)
    if not video_ids:
        raise ValueError(f"store {str(store_path)!r} has no complete video in split {split!r}")
    _check_streams(predictor, store, store_path, video_ids[0])

    def blocks(ids: Sequence[str]) -> Generator[np.ndarray, None, None]:
        return iter_store_embeddings(predictor, store, ids, batch_size=batch_size, budget=budget)

    probe = blocks(video_ids[:1])  # the embedding size, from one video
    first = next(probe)
    probe.close()
    plan = plan_index(len(video_ids), int(first.shape[1]), budget)

    def sample(count: int) -> Generator[np.ndarray, None, None]:
        # an evenly spaced sample of the videos trains the compressed kinds
        for block in blocks([video_ids[int(i)] for i in sample_rows(len(video_ids), count)]):
            yield normalize(block)

    index = empty_index(plan, sample)
    vectors = _fill(index, plan, blocks(video_ids), len(video_ids), Path(run_dir))
    labels = _labels(store, video_ids)
    meta = {
        "run_id": predictor.run_id,
        "store": str(store_path),
        "split": split,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metric": METRIC,
        "exact": plan.exact,
        "index": plan.record(),
        "embedding_dim": plan.e,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if vectors is not None:
        meta["rerank"] = {"file": VECTORS_FILE, "candidates": CANDIDATES}
    result = SimilarityIndex(index, video_ids, labels, meta, vectors)
    result.save(run_dir)
    log.info(
        "similarity index of %d %s videos (%s) written to %s in %.1f s",
        len(result),
        split,
        plan.factory,
        run_dir,
        meta["seconds"],
    )
    return result


def _fill(
    index: faiss.Index, plan: IndexPlan, blocks: Iterable[np.ndarray], n: int, run_dir: Path
) -> VectorFile | None:
    """Add the ``n`` embeddings of ``blocks`` to ``index``; beside a compressed index, also write
    them to ``run_dir`` for re-ranking and return that file (an exact index: None, and an
    earlier compressed build's file is removed)."""

    def added() -> Generator[np.ndarray, None, None]:
        for block in blocks:
            x = normalize(block)
            index.add(x)
            yield x

    if plan.exact:
        for _ in added():
            pass
        (run_dir / VECTORS_FILE).unlink(missing_ok=True)
        return None
    path = write_vectors(run_dir / VECTORS_FILE, added(), n, plan.e)
    return open_vectors(path, n, plan.e)


def _check_streams(
    predictor: Predictor, store: FeatureStore, store_path: str | Path, first_video: str
) -> None:
    """Raise ValueError unless the store holds every stream the run reads, each extracted with
    the run's own extractor."""
    held = set(store.extractor) | set(store.streams(first_video))
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


def _labels(store: FeatureStore, video_ids: Sequence[str]) -> list[str | None]:
    """The label of every video, row by row (None where it has none)."""
    table = store.index_table("complete")
    label_of = dict(zip(table.ids.tolist(), table.text["label"].tolist(), strict=True))
    return [None if (lb := label_of.get(v)) is None else str(lb) for v in video_ids]
