"""Similar-video search: a faiss index of the training videos' video-level embeddings.

Search is by cosine similarity over L2-normalised embeddings, so the inner product is the cosine
and the reported distance is ``1 - cosine`` (0 for the same direction, 2 for the opposite one).
Cosine rather than Euclidean distance because what a head's embedding means is its direction:
heads scale their pooled representation very differently (batch norm, beta-weighted node sums,
concatenations of projected nodes), and a fixed distance range lets a caller read a distance
without knowing the head.

The index is built block by block (a batch of embeddings is normalised and added, then dropped),
so no ``[n, e]`` matrix of every embedding exists, and it is held within a share of the memory
budget (:func:`aggregator.node_cache.memory_budget`, ``--memory-budget``): a quarter, its
training samples within a half. :func:`plan_index` picks the most accurate kind that fits, and
builds it with :func:`faiss.index_factory` over the full embedding:

- **flat** (``Flat``, exact) when the float32 vectors fit the share: every store of up to tens of
  thousands of videos at the default budget, where a scan takes milliseconds and never misses.
- **hnsw** (``HNSW32,SQ8``): an HNSW graph over the vectors quantised to a byte per dimension
  (a quarter of flat), when that fits; searched with ``efSearch`` 128.
- **ivfpq** (``IVF{nlist},PQ{M}x{nbits}``) otherwise: an inverted file of ``sqrt(n)`` lists
  (a quarter of them probed) whose residuals are product-quantised with the most
  sub-quantizers that fit the share (at most 256), after a rotation onto the ``r = 4 M``
  leading uncentred principal directions of the embedding (when ``4 M`` is below its size).
  The rotation, the coarse centroids and the codebooks are trained on evenly spaced samples
  of the videos.

The ``tp`` concat embedding is 63 x 128 = 8,064 floats (7.7 GB per float32 copy at 240,000
videos); at ``--memory-budget 128M`` its index is an IVF-PQ of about 140 bytes a video. The
index records its kind, factory string and parameters (``index`` in ``index_ids.json``).
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
import math
import os
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
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
INDEX_SHARE = 4  # the index holds at most memory_budget() // INDEX_SHARE bytes
TRAIN_SHARE = 2  # its training samples at most memory_budget() // TRAIN_SHARE bytes
PCA_SAMPLE = 4096  # videos embedded to train an HNSW's scalar quantiser (at most)
MIN_PQ = 8  # sub-quantizers of an IVF-PQ at least (and no compression below 8 dimensions)
MAX_PQ = 256  # sub-quantizers at most: each trains its own k-means codebook
PQ_DSUB = 4  # rotated dimensions per sub-quantizer (faiss' guideline: 4 M dimensions, M codes)
MIN_TRAIN_PER_CENTROID = 39  # what faiss' k-means asks for (the coarse centroids get it)
PQ_TRAIN_PER_CENTROID = 8  # a codebook's k-means: at least this many points a centroid
TRAIN_MIN_BYTES = 64 << 20  # training samples may always take this much (freed before adding)
TRAIN_MAX = 20_000  # videos that train an IVF-PQ's centroids and codebooks (at most)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128


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
    """Cosine search over the embeddings of ``video_ids`` (row i is ``video_ids[i]``)."""

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
        return out

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

    ``kind`` is ``flat`` (exact), ``hnsw`` or ``ivfpq``; ``factory`` the :func:`faiss.index_factory`
    string that builds it; ``params`` its parameters (search-time ones included: ``nprobe``,
    ``efSearch``); ``sample`` the videos embedded to train it at full dimension and
    ``train_sample`` those embedded to train its quantisers after the rotation (0 when unused);
    ``nbytes`` the planned size of the index (what :func:`faiss.serialize_index` writes, about).
    """

    n: int
    e: int
    share: int
    kind: str
    factory: str
    params: Mapping[str, int] = field(default_factory=dict)
    sample: int = 0
    train_sample: int = 0
    nbytes: int = 0

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def record(self) -> dict[str, Any]:
        """What an index records of its plan (``index_ids.json``, ``/v1/models``)."""
        return {"kind": self.kind, "factory": self.factory, "params": dict(self.params)}


def _hnsw_bytes(n: int, e: int) -> int:
    # SQ8 codes, the level-0 links (2 M int32) with ~10% upper levels, level and offset tables
    return n * (e + int(2.2 * 4 * HNSW_M) + 12) + 8 * e


def _ivfpq_plan(n: int, e: int, share: int, train_bytes: int) -> IndexPlan | None:
    """The IVF-PQ with the most sub-quantizers whose bytes fit ``share`` (None if none does).

    Where ``PQ_DSUB * M < e`` the embedding is first rotated onto its ``r = PQ_DSUB * M``
    leading uncentred principal directions (``PCAR``, trained on a sample of at most
    ``train_bytes``): the codes then spend their bits on the directions that carry the
    embedding's inner products (the ``tp`` concat embedding repeats every leaf in the nodes
    above it, which a product quantiser over the raw coordinates would encode over and over).
    """
    pca_sample = min(n, PCA_SAMPLE, train_bytes // (5 * e))  # the sample, its Gram matrix, the map
    for m in range(min(e, MAX_PQ), 0, -1):
        rotate = PQ_DSUB * m < e
        r = PQ_DSUB * m if rotate else e
        if not rotate and e % m:
            continue
        if rotate and r > pca_sample:
            continue
        train = min(n, TRAIN_MAX, max(1, train_bytes // (4 * r)))
        nlist = max(1, min(math.isqrt(n), train // MIN_TRAIN_PER_CENTROID))
        nbits = max(1, min(8, int(math.log2(max(2, train // PQ_TRAIN_PER_CENTROID)))))
        if (1 << nbits) > train:
            continue
        nbytes = 4 * e + 4 * r * nlist + 4 * (1 << nbits) * r + n * (-(-m * nbits // 8) + 16)
        nbytes += 4 * r * e if rotate else 0
        if nbytes > share:
            continue
        factory = f"IVF{nlist},PQ{m}x{nbits}"
        params = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": max(1, -(-nlist // 4))}
        if rotate:
            params["rotated_dim"] = r
        return IndexPlan(
            n, e, share, "ivfpq", factory, params, pca_sample if rotate else 0, train, nbytes
        )
    return None


def plan_index(n: int, e: int, budget: int | None = None) -> IndexPlan:
    """The index for ``n`` embeddings of size ``e`` under a memory ``budget`` (bytes; default
    :func:`aggregator.node_cache.memory_budget`), the most accurate whose bytes fit a quarter of
    the budget: exact (``Flat``) when the float32 vectors fit; else an HNSW graph over 8-bit
    scalar-quantised vectors (``HNSW32,SQ8``, the full embedding at a byte per dimension); else
    an IVF-PQ (see :func:`_ivfpq_plan`). Training samples are held within half the budget."""
    if n < 1 or e < 1:
        raise ValueError(f"an index needs n >= 1 embeddings of size e >= 1, got n={n}, e={e}")
    if budget is None:
        from aggregator.node_cache import memory_budget

        budget = memory_budget()
    share = max(0, budget) // INDEX_SHARE
    train_bytes = max(TRAIN_MIN_BYTES, max(0, budget) // TRAIN_SHARE)
    flat = 4 * n * e
    if flat <= share or e <= MIN_PQ:
        if flat > share:
            log.warning(
                "similarity index of %d x %d floats exceeds its memory share (%.1f MiB)",
                n,
                e,
                share / 2**20,
            )
        return IndexPlan(n, e, share, "flat", "Flat", nbytes=flat)
    hnsw = _hnsw_bytes(n, e)
    if hnsw <= share:
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
        sample = min(n, PCA_SAMPLE, max(1, train_bytes // (4 * e)))
        return IndexPlan(n, e, share, "hnsw", f"HNSW{HNSW_M},SQ8", params, sample, 0, hnsw)
    plan = _ivfpq_plan(n, e, share, train_bytes)
    if plan is None:
        m = MIN_PQ
        r = PQ_DSUB * m
        log.warning(
            "no IVF-PQ of %d videos fits the similarity index's memory share (%.1f MiB); "
            "using %d sub-quantizers anyway",
            n,
            share / 2**20,
            m,
        )
        nlist = max(1, min(math.isqrt(n), n // MIN_TRAIN_PER_CENTROID))
        nbits = max(1, min(8, int(math.log2(max(2, n // PQ_TRAIN_PER_CENTROID)))))
        rotate = r < e and r <= n
        factory = f"IVF{nlist},PQ{m}x{nbits}"
        params = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": max(1, -(-nlist // 4))}
        if rotate:
            params["rotated_dim"] = r
        elif e % m:
            return IndexPlan(n, e, share, "flat", "Flat", nbytes=flat)
        d = r if rotate else e
        nbytes = 4 * d * (e + nlist + (1 << nbits)) + n * (-(-m * nbits // 8) + 16)
        plan = IndexPlan(n, e, share, "ivfpq", factory, params, n if rotate else 0, n, nbytes)
    return plan


def _collect(blocks: Iterable[np.ndarray], width: int) -> np.ndarray:
    parts = [np.ascontiguousarray(b, dtype=np.float32).reshape(-1, width) for b in blocks]
    if not parts:
        raise ValueError("no embedding to train the similarity index on")
    return np.concatenate(parts)


def uncentred_pca(x: np.ndarray, r: int, seed: int = 0) -> faiss.LinearTransform:
    """The linear map ``[e] -> [r]`` onto the ``r`` leading principal directions of the rows of
    ``x`` ``[s, e]`` about the origin (no mean subtracted: inner products within the subspace are
    kept as they are), followed by a random rotation that spreads the variance evenly over the
    product quantiser's sub-vectors (as faiss' ``PCAR``). From the ``s x s`` Gram matrix when
    the sample is smaller than ``e``, so that no ``e x e`` matrix exists."""
    s_rows, e = x.shape
    if not 1 <= r <= min(s_rows, e):
        raise ValueError(f"a rotation to {r} dimensions needs a sample [s >= {r}, e >= {r}]")
    x64 = x.astype(np.float64)
    if s_rows >= e:  # the e x e second moments
        values, vectors = np.linalg.eigh(x64.T @ x64)  # ascending
        directions = vectors[:, np.argsort(values)[::-1][:r]]  # [e, r]
    else:  # the s x s Gram matrix
        values, vectors = np.linalg.eigh(x64 @ x64.T)
        top = np.argsort(values)[::-1][:r]
        scale = np.sqrt(np.maximum(values[top], 1e-12))
        directions = (x64.T @ vectors[:, top]) / scale  # [e, r], orthonormal columns
    del x64
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((r, r)))
    a = np.ascontiguousarray((directions @ q).T, dtype=np.float32)  # [r, e]
    transform = faiss.LinearTransform(e, r, False)
    faiss.copy_array_to_vector(a.ravel(), transform.A)
    transform.is_trained = True
    return transform


def empty_index(plan: IndexPlan, sample: Callable[[int], Iterable[np.ndarray]]) -> faiss.Index:
    """An empty, trained faiss index for ``plan`` (built by :func:`faiss.index_factory`, inner
    product). ``sample(count)`` yields normalised embeddings ``[b, e]`` of ``count`` videos
    spread over the set, block by block; it is called for the training samples only."""
    rotated = int(plan.params.get("rotated_dim", 0))
    d = rotated or plan.e
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "flat":
        return index
    if plan.kind == "hnsw":
        index.train(_collect(sample(plan.sample), plan.e))
        configure_search(index, plan.params)
        return index
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    # the plan sizes the samples; faiss' k-means would warn (on stderr, per codebook) below 39
    ivf.cp.min_points_per_centroid = 1
    ivf.pq.cp.min_points_per_centroid = 1
    if rotated:
        transform = uncentred_pca(_collect(sample(plan.sample), plan.e), rotated)
        z = _collect(
            (transform.apply(np.ascontiguousarray(b)) for b in sample(plan.train_sample)),
            rotated,
        )
        index.train(z)
        del z
        ivf.make_direct_map()  # vector(): decode a video's stored code
        configure_search(index, plan.params)
        return faiss.IndexPreTransform(transform, index)  # keeps references to both
    index.train(_collect(sample(plan.train_sample), plan.e))
    ivf.make_direct_map()  # vector(): decode a video's stored code
    configure_search(index, plan.params)
    return index


def configure_search(index: faiss.Index, params: Mapping[str, Any]) -> None:
    """Apply the search-time parameters a plan records (``nprobe``, ``efSearch``)."""
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "efSearch" in params:
        hnsw: Any = faiss.downcast_index(index)
        hnsw.hnsw.efSearch = int(params["efSearch"])


def sample_rows(n: int, count: int) -> np.ndarray:
    """``count`` (at most ``n``) evenly spaced row numbers of ``n``."""
    return np.unique(np.linspace(0, n - 1, max(1, min(n, count))).round().astype(np.int64))


def index_matrix(
    embeddings: np.ndarray, budget: int | None = None
) -> tuple[faiss.Index, IndexPlan]:
    """The planned, trained and filled index of an in-memory matrix ``[n, e]`` (normalised here)."""
    x = normalize(embeddings)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"expected embeddings [n, e] with n >= 1, got shape {x.shape}")
    plan = plan_index(x.shape[0], x.shape[1], budget)
    index = empty_index(plan, lambda count: [x[sample_rows(len(x), count)]])
    index.add(x)
    return index, plan


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

    def sample(count: int) -> Generator[np.ndarray, None, None]:
        # an evenly spaced sample of the videos trains the compressed kinds
        for block in blocks([video_ids[int(i)] for i in sample_rows(len(video_ids), count)]):
            yield normalize(block)

    index = empty_index(plan, sample)
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
        "index": plan.record(),
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
        plan.factory,
        run_dir,
        meta["seconds"],
    )
    return result
