"""The faiss side of the similar-video index: which kind holds ``n`` embeddings within a share
of the memory budget, and how it is trained, filled and searched.

Search is by cosine similarity over L2-normalised embeddings (:func:`normalize`), so every index
is an inner-product one. The index is held within a share of the memory budget
(:func:`aggregator.node_cache.memory_budget`, ``--memory-budget``): a quarter, its training
samples within a half. :func:`plan_index` picks the most accurate kind that fits, and
:func:`empty_index` builds it with :func:`faiss.index_factory` over the full embedding:

- **flat** (``Flat``, exact) when the float32 vectors fit the share: every store of up to tens of
  thousands of videos at the default budget, where a scan takes milliseconds and never misses.
- **hnsw** (``HNSW32,SQ8``): an HNSW graph over the vectors quantised to a byte per dimension
  (a quarter of flat), when that fits; searched with ``efSearch`` 128.
- **ivfpq** (``IVF{nlist},PQ{M}x{nbits}``) otherwise: an inverted file of ``sqrt(n)`` lists
  (a quarter of them probed) whose residuals are product-quantised with the most
  sub-quantizers that fit the share (at most 256), after a rotation onto the ``r = 2 M``
  leading uncentred principal directions of the embedding (when ``2 M`` is below its size).
  The rotation, the coarse centroids and the codebooks are trained on evenly spaced samples
  of the videos.

The ``tp`` concat embedding is 63 x 128 = 8,064 floats (7.7 GB per float32 copy at 240,000
videos); at ``--memory-budget 128M`` its index is an IVF-PQ of about 140 bytes a video.
Compressed kinds return approximate neighbours and distances (decoded codes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

_EPS = 1e-12
INDEX_SHARE = 4  # the index holds at most memory_budget() // INDEX_SHARE bytes
TRAIN_SHARE = 2  # its training samples at most memory_budget() // TRAIN_SHARE bytes
PCA_SAMPLE = 4096  # videos embedded to train an HNSW's scalar quantiser (at most)
MIN_PQ = 8  # sub-quantizers of an IVF-PQ at least (and no compression below 8 dimensions)
MAX_PQ = 256  # sub-quantizers at most: each trains its own k-means codebook
# rotated dimensions per sub-quantizer: 2 rather than faiss' usual 4, since at a few hundred
# bytes a video a smaller rotation leaves bytes for more codes, and a byte per 2 dimensions keeps
# more of the leading directions (held-out recall@10 at 30,000 videos under 128M: 0.90 vs 0.78)
PQ_DSUB = 2
NPROBE_SHARE = 4  # an IVF-PQ probes nlist / NPROBE_SHARE of its lists
MIN_TRAIN_PER_CENTROID = 39  # what faiss' k-means asks for (the coarse centroids get it)
PQ_TRAIN_PER_CENTROID = 8  # a codebook's k-means: at least this many points a centroid
TRAIN_MIN_BYTES = 64 << 20  # training samples may always take this much (freed before adding)
TRAIN_MAX = 20_000  # videos that train an IVF-PQ's centroids and codebooks (at most)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (``[n, e]`` or ``[e]``) scaled to unit L2 norm (float32); zero rows stay 0."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim not in (1, 2):
        raise ValueError(f"expected an embedding [e] or a matrix [n, e], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, _EPS), dtype=np.float32)


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


def ivfpq_plan(
    n: int,
    e: int,
    share: int,
    train_bytes: int,
    *,
    dsub: int = PQ_DSUB,
    probe_share: int = NPROBE_SHARE,
) -> IndexPlan | None:
    """The IVF-PQ with the most sub-quantizers whose bytes fit ``share`` (None if none does),
    ``dsub`` rotated dimensions per sub-quantizer, ``nlist / probe_share`` lists probed.

    Where ``dsub * M < e`` the embedding is first rotated onto its ``r = dsub * M``
    leading uncentred principal directions (``PCAR``, trained on a sample of at most
    ``train_bytes``): the codes then spend their bits on the directions that carry the
    embedding's inner products (the ``tp`` concat embedding repeats every leaf in the nodes
    above it, which a product quantiser over the raw coordinates would encode over and over).
    """
    pca_sample = min(n, PCA_SAMPLE, train_bytes // (5 * e))  # the sample, its Gram matrix, the map
    for m in range(min(e, MAX_PQ), 0, -1):
        rotate = dsub * m < e
        r = dsub * m if rotate else e
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
        nprobe = max(1, -(-nlist // probe_share))
        params = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe}
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
    an IVF-PQ (see :func:`ivfpq_plan`). Training samples are held within half the budget."""
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
    plan = ivfpq_plan(n, e, share, train_bytes)
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
    # index_factory turns on polysemous training for 8-bit codes: a simulated annealing over
    # every codebook's centroid order, for Hamming-distance filtering that search never uses
    # (polysemous_ht stays 0); it took most of the training's CPU time
    ivf.do_polysemous_training = False
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
