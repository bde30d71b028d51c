"""Similar-video search: a faiss index of the training videos' video-level embeddings.

Search is by cosine similarity over L2-normalised embeddings, so the inner product is the cosine
and the reported distance is ``1 - cosine`` (0 for the same direction, 2 for the opposite one).
Cosine rather than Euclidean distance because what a head's embedding means is its direction:
heads scale their pooled representation very differently (batch norm, beta-weighted node sums,
concatenations of projected nodes), and a fixed distance range lets a caller read a distance
without knowing the head.

The index is built block by block (a batch of embeddings is normalised and added, then dropped),
so no ``[n, e]`` matrix of every embedding exists, and its vectors are held within a share of the
memory budget (:func:`aggregator.node_cache.memory_budget`, ``--memory-budget``): a quarter.

- **Exact** (``IndexFlatIP`` over the float32 embeddings) when ``4 * n * e`` bytes fit that
  share: every store of up to tens of thousands of videos at the default budget, where a flat
  scan takes milliseconds and never misses a neighbour.
- **Reduced** otherwise: the normalised embeddings are projected onto their first ``r`` principal
  components (PCA fitted on an evenly spaced sample of at most 4,096 videos, itself within the
  share), normalised again, and searched exactly in ``r`` dimensions, with ``r`` the largest that
  fits the share. Memory stays bounded at any number of videos, the service loads the same small
  index, and neighbours are those of the cosine in the principal subspace (the ``tp`` concat
  embedding is 63 x 128 = 8,064 floats: 6.2 GB per float32 copy at 192,000 videos). A
  projection rather than a product quantiser because the ranking stays exact within the
  subspace and needs one small training sample; the index records ``exact`` and ``reduced_dim``.

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
from collections.abc import Generator, Mapping, Sequence
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
INDEX_SHARE = 4  # the index's vectors hold at most memory_budget() // INDEX_SHARE bytes
PCA_SAMPLE = 4096  # videos embedded to fit the projection of a reduced index (at most)
MIN_REDUCED_DIM = 8


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


@dataclass(frozen=True)
class IndexPlan:
    """How the index of ``n`` embeddings of size ``e`` holds its vectors within ``share`` bytes.

    ``reduced_dim`` is None for the exact index, else the number of principal components kept;
    ``sample`` is the number of videos embedded to fit the projection (0 when exact).
    """

    n: int
    e: int
    share: int
    reduced_dim: int | None
    sample: int

    @property
    def exact(self) -> bool:
        return self.reduced_dim is None

    @property
    def vector_bytes(self) -> int:
        """Bytes of the index's stored vectors (float32)."""
        return 4 * self.n * (self.e if self.reduced_dim is None else self.reduced_dim)


def plan_index(n: int, e: int, budget: int | None = None) -> IndexPlan:
    """The index for ``n`` embeddings of size ``e`` under a memory ``budget`` (bytes; default
    :func:`aggregator.node_cache.memory_budget`): exact when its float32 vectors fit a quarter of
    the budget, else reduced to the most principal components that fit (at least 8)."""
    if n < 1 or e < 1:
        raise ValueError(f"an index needs n >= 1 embeddings of size e >= 1, got n={n}, e={e}")
    if budget is None:
        from aggregator.node_cache import memory_budget

        budget = memory_budget()
    share = max(0, budget) // INDEX_SHARE
    if 4 * n * e <= share or e <= MIN_REDUCED_DIM:
        if 4 * n * e > share:
            log.warning(
                "similarity index of %d x %d floats exceeds its memory share (%.1f MiB)",
                n,
                e,
                share / 2**20,
            )
        return IndexPlan(n, e, share, None, 0)
    sample = min(n, PCA_SAMPLE, share // (4 * e))
    reduced = min(e - 1, share // (4 * n), sample)
    if reduced < MIN_REDUCED_DIM:
        reduced = MIN_REDUCED_DIM
        log.warning(
            "a %d-dimensional similarity index of %d videos exceeds its memory share (%.1f MiB)",
            reduced,
            n,
            share / 2**20,
        )
    return IndexPlan(n, e, share, reduced, min(n, max(sample, reduced)))


def empty_index(plan: IndexPlan, sample: np.ndarray | None = None) -> faiss.Index:
    """An empty faiss index for ``plan``: ``IndexFlatIP`` when exact, else the projection fitted
    on ``sample`` (normalised embeddings ``[s, e]``), normalisation, and ``IndexFlatIP``."""
    if plan.reduced_dim is None:
        return faiss.IndexFlatIP(plan.e)
    if sample is None or sample.ndim != 2 or sample.shape[1] != plan.e:
        shape = None if sample is None else sample.shape
        raise ValueError(f"a reduced index needs a sample of embeddings [s, {plan.e}], got {shape}")
    pca = faiss.PCAMatrix(plan.e, plan.reduced_dim)
    pca.train(np.ascontiguousarray(sample, dtype=np.float32))
    flat = faiss.IndexFlatIP(plan.reduced_dim)
    inner = faiss.IndexPreTransform(faiss.NormalizationTransform(plan.reduced_dim, 2.0), flat)
    return faiss.IndexPreTransform(pca, inner)


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
        from aggregator.train import pyramid_leaf_streams

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
    time, and the index holds its vectors within a quarter of ``budget`` (default
    :func:`aggregator.node_cache.memory_budget`): exact when they fit, else reduced
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

    def blocks(ids: Sequence[str]) -> Generator[np.ndarray, None, None]:
        return iter_store_embeddings(predictor, store, ids, batch_size=batch_size, budget=budget)

    probe = blocks(video_ids[:1])  # the embedding size, from one video
    first = next(probe)
    probe.close()
    plan = plan_index(len(video_ids), int(first.shape[1]), budget)
    sample = None
    if not plan.exact:  # an evenly spaced sample of videos fits the projection
        at = np.unique(np.linspace(0, len(video_ids) - 1, plan.sample).round().astype(np.int64))
        picked = [video_ids[int(i)] for i in at]
        sample = np.empty((len(picked), plan.e), dtype=np.float32)
        done = 0
        for block in blocks(picked):
            sample[done : done + len(block)] = normalize(block)
            done += len(block)
    index = empty_index(plan, sample)
    del sample
    for block in blocks(video_ids):
        index.add(normalize(block))
    table = store.index_table("complete")
    label_of = dict(zip(table.ids.tolist(), table.text["label"].tolist(), strict=True))
    labels = [label_of.get(v) for v in video_ids]
    meta = {
        "run_id": predictor.run_id,
        "store": str(store_path),
        "split": split,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metric": METRIC,
        "exact": plan.exact,
        "reduced_dim": plan.reduced_dim,
        "embedding_dim": plan.e,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    result = SimilarityIndex(
        index, video_ids, [None if lb is None else str(lb) for lb in labels], meta
    )
    result.save(run_dir)
    log.info(
        "similarity index of %d %s videos (%s) written to %s in %.1f s",
        len(result),
        split,
        "exact" if plan.exact else f"{plan.reduced_dim} principal components of {plan.e}",
        run_dir,
        meta["seconds"],
    )
    return result
