"""The store and the node cache at scale: write, open + list + info, full scan, node-cache build,
and the peak RSS of ``framepool train --head tp --levels 6`` in memory and streamed.

Writes a store of ``--videos`` synthetic videos (one stream, float16 features of ``--dim`` and a
random T in ``--frames``) through the public API with ``--writers`` processes (the many-writers
path of sharded extraction), then measures each step in a fresh process (wall seconds, CPU
seconds of that process, its peak RSS):

- ``write``: ``FeatureStore.write_video`` of every video, ``--writers`` processes at once;
- ``open+list+info``: ``FeatureStore.open`` + ``videos(split="train")`` + ``info()`` (best of 3);
- ``scan``: ``read`` of every video, 8 threads;
- ``node cache``: building the depth-6 node cache (parallel, block by block);
- ``train (memory)``: ``framepool train --head tp --levels 6`` with the default memory budget
  (the node cache present; one fixed learning rate and weight decay, no probes; the similarity
  index built after training, as by default, unless ``--no-index``: its build seconds and
  dimension, reduced when the exact index exceeds a quarter of the budget, are printed too);
- ``train (streamed)``: the same with ``--memory-budget --budget``, so that training streams
  row blocks of the node cache.

A summary line per size and a Kinetics-400 extrapolation (240,000 videos, T = 300, d = 2048) from
the measured per-video rates close the output. Results are also written to ``--json``.

    python benchmarks/store_scale.py --videos 10000 --dir /tmp/scale
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
K400 = {"videos": 240_000, "frames": 300, "dim": 2048}


# ---------------------------------------------------------------------------------- steps (child)
def step_write(store: str, first: int, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from storage import FeatureStore

    lo, hi = (int(x) for x in args.frames.split(":"))
    rng = np.random.default_rng(first)
    pool = rng.standard_normal((16, hi, args.dim)).astype(np.float16)
    fs = FeatureStore.create(store, class_names=[f"class{c:03d}" for c in range(args.classes)])
    frames = 0
    for i in range(first, first + n):
        t = int(rng.integers(lo, hi + 1))
        fs.write_video(
            f"video{i:07d}",
            {"appearance": pool[i % 16, :t] + np.float16(i % 7)},
            label=f"class{i % args.classes:03d}",
            split="test" if i % 5 == 0 else "train",
            meta={"n_frames": t},
        )
        frames += t
    return {"videos": n, "frames": frames}


def step_open(store: str, args: argparse.Namespace) -> dict[str, Any]:
    from storage import FeatureStore

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fs = FeatureStore.open(store, "r")
        n_train = len(fs.videos(split="train"))
        info = fs.info()
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "train": n_train, "videos": info["n_videos"]}


def step_scan(store: str, args: argparse.Namespace) -> dict[str, Any]:
    from storage import FeatureStore

    fs = FeatureStore.open(store, "r")
    ids = fs.videos()
    t0 = time.perf_counter()
    frames = 0
    for start in range(0, len(ids), 512):
        for x in fs.read_many(ids[start : start + 512], "appearance", np.float16, threads=8):
            frames += len(x)
    return {"seconds": time.perf_counter() - t0, "videos": len(ids), "frames": frames}


def step_cache(store: str, args: argparse.Namespace) -> dict[str, Any]:
    from aggregator.node_cache import load_node_cache
    from storage import FeatureStore

    fs = FeatureStore.open(store, "r+")
    t0 = time.perf_counter()
    cache = load_node_cache(fs, "appearance", progress=False, budget=0)
    return {"seconds": time.perf_counter() - t0, "videos": len(cache), "bytes": cache.nbytes()}


# ---------------------------------------------------------------------------------- index
INDEX_CHUNK = 2000
INDEX_D_IN = 256  # frame feature size of the generated videos (the embedding is 63 x 128)
INDEX_CLASSES = 400


class EmbeddingSource:
    """``tp`` concat embeddings (depth 6, 128 per node: 8,064 floats) of generated videos, made
    chunk by chunk from a seed so that no ``[n, 8064]`` matrix is ever held.

    Each video's 32 leaf means (of 256-d frame features) are its class centre (400 classes,
    N(0, 1)), plus a video offset (N(0, 0.6^2)), plus a slow drift (3 cosines over the video with
    N(0, 0.3^2) coefficients), plus leaf noise (N(0, 0.2^2)); the node means are the pyramid
    mixes of the leaves, and the embedding is what a real ``TemporalPyramid`` head (random
    weights, beta_hat ~ N(0, 0.5^2), eval mode) computes from them: projection, batch norm and
    beta scaling per node, concatenated.
    """

    def __init__(self, seed: int = 0) -> None:
        import torch

        from aggregator.heads.tp import TemporalPyramid
        from aggregator.intervals import pyramid_mix

        torch.manual_seed(seed)
        torch.set_num_threads(1)
        self.head = TemporalPyramid(in_features=INDEX_D_IN, num_classes=INDEX_CLASSES).eval()
        with torch.no_grad():
            self.head.beta_hat.normal_(0.0, 0.5)
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((INDEX_CLASSES, INDEX_D_IN)).astype(np.float32)
        self.mix = torch.from_numpy(pyramid_mix(128, 6).astype(np.float32))  # [63, 32]
        t = (np.arange(32) + 0.5) / 32
        self.cos = np.stack([np.cos(np.pi * k * t) for k in (1, 2, 3)]).astype(np.float32)
        self.seed = seed

    @property
    def dim(self) -> int:
        return int(self.head.feature_dim)

    def chunk(self, stream: int, i: int, n: int = INDEX_CHUNK) -> np.ndarray:
        """``[n, 8064]`` float32 embeddings, L2-normalised: chunk ``i`` of stream ``stream``."""
        import torch

        from aggregator.faiss_index import normalize
        from aggregator.intervals import PyramidLeaves

        rng = np.random.default_rng([self.seed, stream, i])
        y = rng.integers(0, INDEX_CLASSES, n)
        leaves = self.centres[y][:, None, :] + 0.6 * rng.standard_normal((n, 1, INDEX_D_IN))
        coef = 0.3 * rng.standard_normal((n, 3, INDEX_D_IN)).astype(np.float32)
        leaves = leaves + np.einsum("kl,nkd->nld", self.cos, coef)
        leaves = leaves + 0.2 * rng.standard_normal((n, 32, INDEX_D_IN))
        with torch.no_grad():
            z = self.head.features(
                PyramidLeaves(
                    torch.from_numpy(leaves.astype(np.float32)), self.mix.expand(n, -1, -1)
                )
            )
        return normalize(z.numpy())

    def blocks(self, stream: int, count: int) -> Any:
        for i in range(-(-count // INDEX_CHUNK)):
            yield self.chunk(stream, i, min(INDEX_CHUNK, count - i * INDEX_CHUNK))


INDEXED, QUERIES, TRAINING = 0, 1, 2  # the generator's streams: indexed, held-out, training


def projection_index(e: int, r: int, sample: np.ndarray) -> Any:
    """The reduced index of earlier versions: centred PCA to ``r`` dimensions, normalised, exact."""
    import faiss

    pca = faiss.PCAMatrix(e, r)
    pca.train(sample)
    flat = faiss.IndexFlatIP(r)
    inner = faiss.IndexPreTransform(faiss.NormalizationTransform(r, 2.0), flat)
    return faiss.IndexPreTransform(pca, inner)


def old_projection_dim(n: int, e: int, budget: int) -> tuple[int, int]:
    """The principal components (and the sample) earlier versions kept: the most that fit a
    quarter of the budget, from at most 4,096 sampled videos."""
    share = budget // 4
    sample = min(n, 4096, share // (4 * e))
    return max(8, min(e - 1, share // (4 * n), sample)), max(sample, 8)


def index_benchmark(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Recall@10 against exact search, build seconds, bytes and query p50/p99 of the planned
    index (and of earlier versions' projection) over ``n`` generated videos."""
    import faiss

    from aggregator.faiss_index import (
        INDEX_SHARE,
        TRAIN_MIN_BYTES,
        TRAIN_SHARE,
        empty_index,
        ivfpq_plan,
        plan_index,
    )
    from aggregator.node_cache import parse_bytes

    faiss.omp_set_num_threads(args.threads)
    budget = parse_bytes(args.memory_budget)
    src = EmbeddingSource(args.seed)
    e = src.dim
    queries = np.concatenate(list(src.blocks(QUERIES, args.queries)))
    plan = plan_index(n, e, budget)
    methods: dict[str, dict[str, Any]] = {}

    def train_sample(count: int) -> Any:
        return src.blocks(TRAINING, count)

    plans = {plan.kind: plan}
    for spec in (v for v in args.also_ivfpq.split(",") if v):
        dsub, probe_share = (int(v) for v in spec.split("/"))
        train_bytes = max(TRAIN_MIN_BYTES, budget // TRAIN_SHARE)
        other = ivfpq_plan(
            n, e, budget // INDEX_SHARE, train_bytes, dsub=dsub, probe_share=probe_share
        )
        if other is not None:
            plans[f"ivfpq {dsub} dims a code, 1/{probe_share} probed"] = other
    for name, p in plans.items():
        t0, c0 = time.perf_counter(), time.process_time()
        methods[name] = {
            "index": empty_index(p, train_sample),
            "factory": p.factory,
            "params": dict(p.params),
            "train": time.perf_counter() - t0,
            "train_cpu": time.process_time() - c0,
        }
    dims = {old_projection_dim(n, e, budget)[0]} | {
        int(r) for r in args.projection_dims.split(",") if r
    }
    for r in sorted(dims):
        t0, c0 = time.perf_counter(), time.process_time()
        sample = np.concatenate(list(src.blocks(TRAINING, old_projection_dim(n, e, budget)[1])))
        methods[f"projection {r}"] = {
            "index": projection_index(e, r, sample),
            "factory": f"PCA{r},L2norm,Flat",
            "params": {"reduced_dim": r},
            "train": time.perf_counter() - t0,
            "train_cpu": time.process_time() - c0,
        }
        del sample
    for m in methods.values():
        m["add"] = m["add_cpu"] = 0.0
    # the full vectors on disk beside a compressed plan, for its re-ranked searches
    vec_dir = tempfile.TemporaryDirectory(prefix="index-vectors-")
    writer = None
    if not plan.exact:
        from aggregator.rerank import VectorsWriter

        writer = VectorsWriter(Path(vec_dir.name) / "vectors.npy", n, e)
    write_s = write_cpu = 0.0
    k = 10
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    exact_s = 0.0
    done = 0
    for block in src.blocks(INDEXED, n):
        t0 = time.perf_counter()
        sims = queries @ block.T  # exact search, streamed: the running top 10
        both_s = np.concatenate([best_s, sims], axis=1)
        both_i = np.concatenate(
            [best_i, done + np.arange(len(block))[None, :].repeat(len(queries), 0)], axis=1
        )
        top = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(both_s, top, 1)
        best_i = np.take_along_axis(both_i, top, 1)
        exact_s += time.perf_counter() - t0
        if writer is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            writer.add(block)
            write_s, write_cpu = (
                write_s + time.perf_counter() - t0,
                write_cpu + time.process_time() - c0,
            )
        for m in methods.values():
            t0, c0 = time.perf_counter(), time.process_time()
            m["index"].add(block)
            m["add"] += time.perf_counter() - t0
            m["add_cpu"] += time.process_time() - c0
        done += len(block)
        if done % 20000 == 0:
            print(f"  {done}/{n} videos added", file=sys.stderr, flush=True)
    truth = [set(row.tolist()) for row in best_i]
    rows: dict[str, Any] = {
        "videos": n,
        "dim": e,
        "budget": args.memory_budget,
        "share": budget // 4,
        "queries": len(queries),
        "exact_scan_s": exact_s,
    }
    for name, m in methods.items():
        index = m["index"]
        times = []
        found = []
        for q in queries:
            t0 = time.perf_counter()
            _, got = index.search(q[None, :], k)
            times.append(time.perf_counter() - t0)
            found.append(got[0])
        recall = float(np.mean([len(truth[i] & set(f.tolist())) / k for i, f in enumerate(found)]))
        rows[name] = {
            "factory": m["factory"],
            "params": m["params"],
            "recall_at_10": recall,
            "build_s": m["train"] + m["add"],
            "build_cpu_s": m["train_cpu"] + m["add_cpu"],
            "bytes": int(faiss.serialize_index(index).nbytes),
            "query_p50_ms": 1e3 * float(np.percentile(times, 50)),
            "query_p99_ms": 1e3 * float(np.percentile(times, 99)),
        }
        print(f"  {name}: {rows[name]}", file=sys.stderr, flush=True)
    if writer is not None:
        from aggregator.rerank import open_vectors

        vectors = open_vectors(writer.close(), n, e)
        rows[f"{plan.kind} + re-rank"] = rerank_row(
            methods[plan.kind], rows[plan.kind], vectors, queries, truth, (write_s, write_cpu)
        )
        del vectors
    vec_dir.cleanup()
    rows["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return rows


def rerank_row(
    method: dict[str, Any],
    row: dict[str, Any],
    vectors: Any,
    queries: np.ndarray,
    truth: list[set[int]],
    write: tuple[float, float],
) -> dict[str, Any]:
    """The compressed index searched for ``CANDIDATES`` x 10 candidates, re-ranked by their exact
    similarity from the full vectors on disk (as :class:`aggregator.similarity.SimilarityIndex`
    does for a compressed kind)."""
    from aggregator.rerank import CANDIDATES, rerank

    k = 10
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, rows = method["index"].search(q[None, :], CANDIDATES * k)
        _, best = rerank(vectors, q, rows[0])
        times.append(time.perf_counter() - t0)
        found.append(best[:k])
    recall = float(np.mean([len(truth[i] & set(f.tolist())) / k for i, f in enumerate(found)]))
    out = {
        **row,
        "factory": f"{row['factory']} + re-rank of {CANDIDATES * k}",
        "recall_at_10": recall,
        "build_s": row["build_s"] + write[0],
        "build_cpu_s": row["build_cpu_s"] + write[1],
        "disk_bytes": int(vectors.path.stat().st_size),
        "query_p50_ms": 1e3 * float(np.percentile(times, 50)),
        "query_p99_ms": 1e3 * float(np.percentile(times, 99)),
    }
    print(f"  re-ranked: {out}", file=sys.stderr, flush=True)
    return out


def print_index_rows(results: list[dict[str, Any]]) -> None:
    print()
    print("| videos | index | recall@10 | build s (CPU s) | bytes | query p50 / p99 ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        for name, m in r.items():
            if not isinstance(m, dict):
                continue
            print(
                f"| {r['videos']:,} | {name}: `{m['factory']}` | {m['recall_at_10']:.3f} | "
                f"{m['build_s']:.1f} ({m['build_cpu_s']:.1f}) | {m['bytes'] / 2**20:.1f} MiB | "
                f"{m['query_p50_ms']:.2f} / {m['query_p99_ms']:.2f} |"
            )


# ---------------------------------------------------------------------------------- parent
def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its wall and CPU seconds and peak RSS (from wait4), and its last JSON line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    result: dict[str, Any] = {}
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    return {
        **result,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss": usage.ru_maxrss * 1024,
    }


def child(step: str, store: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--step",
        step,
        "--store",
        store,
        "--frames",
        args.frames,
        "--dim",
        str(args.dim),
        "--classes",
        str(args.classes),
        *extra,
    ]


def train(store: str, out: Path, args: argparse.Namespace, budget: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "api.cli", "train", "--store", store, "--head", "tp"]
    cmd += ["--levels", "6", "--out", str(out), "--epochs", str(args.epochs), "--patience", "0"]
    cmd += ["--no-plots", "--threads", "2", "--batch-size", "256", "--no-probe"]
    cmd += ["--lr", "1e-3", "--weight-decay", "1e-4"]  # one configuration: an epoch is one pass
    if args.no_index:
        cmd.append("--no-index")
    r = run_measured(cmd + (["--memory-budget", budget] if budget else []))
    metrics = json.loads((out / "metrics.json").read_text())
    training = metrics["training"]  # steps of one configuration: seconds per epoch of data
    r.update(epoch=training["seconds"] / training["epochs"], data=metrics["seconds_data"])
    ids_file = out / "index_ids.json"
    if not args.no_index and ids_file.is_file():  # what the similarity index step recorded
        meta = json.loads(ids_file.read_text())
        r.update(index=meta.get("seconds"), index_dim=meta.get("reduced_dim") or meta.get("dim"))
    return r


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--videos", type=int, default=10_000)
    p.add_argument("--frames", default="32:96", help="T range lo:hi (default 32:96)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--writers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--budget", default="256M", help="memory budget of the streamed train run")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument(
        "--no-index",
        action="store_true",
        help="train without building the similarity index afterwards",
    )
    p.add_argument(
        "--train-only", action="store_true", help="only the train steps, on the store of --keep"
    )
    p.add_argument("--dir", default="/tmp/framepool-store-scale")
    p.add_argument("--json", default=None, help="append the results to this JSON-lines file")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    p.add_argument(
        "--index",
        action="store_true",
        help="the similar-video index instead: recall@10 against exact search, build seconds, "
        "bytes, query p50/p99 at --index-videos generated videos under --memory-budget",
    )
    p.add_argument("--index-videos", default="10000,240000", help="--index: comma-separated")
    p.add_argument("--memory-budget", default="128M", help="--index: the memory budget")
    p.add_argument("--queries", type=int, default=200, help="--index: held-out queries")
    p.add_argument(
        "--projection-dims",
        default="43",
        help="--index: also measure the earlier projection at these dimensions (beside the one "
        "it would choose)",
    )
    p.add_argument(
        "--also-ivfpq",
        default="",
        metavar="DSUB/PROBE,...",
        help="--index: also measure IVF-PQs within the same share with DSUB rotated dimensions "
        "per sub-quantizer and 1/PROBE of the lists probed (e.g. 2/4,4/1)",
    )
    p.add_argument("--seed", type=int, default=0, help="--index: generator seed")
    p.add_argument("--threads", type=int, default=1, help="--index: faiss threads")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.step:
        steps = {"open": step_open, "scan": step_scan, "cache": step_cache}
        if args.step == "write":
            print(json.dumps(step_write(args.store, args.first, args.count, args)))
        else:
            print(json.dumps(steps[args.step](args.store, args)))
        return

    if args.index:
        print(
            f"# similar-video index, budget {args.memory_budget}; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"load average {os.getloadavg()[0]:.1f}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            flush=True,
        )
        results = []
        for n in (int(v) for v in args.index_videos.split(",")):
            results.append(index_benchmark(n, args))
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
        print_index_rows(results)
        return
    base = Path(args.dir)
    store = str(base / "store.zarr")
    if args.train_only:
        rows = {
            "train (memory)": train(store, base / "run-memory", args, None),
            "train (streamed)": train(store, base / "run-streamed", args, args.budget),
        }
        print_rows(rows, args)
        return
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    from storage import FeatureStore

    FeatureStore.create(store, class_names=[f"class{c:03d}" for c in range(args.classes)])
    print(
        f"# {args.videos} videos, T {args.frames}, d {args.dim}, {args.classes} classes; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    # ---- write: --writers processes, each its own share (sharded extraction's pattern)
    t0 = time.perf_counter()
    share = -(-args.videos // args.writers)
    procs = []
    for w in range(args.writers):
        first, n = w * share, max(0, min(share, args.videos - w * share))
        cmd = child("write", store, args, "--first", str(first), "--count", str(n))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}))
    cpu = rss = 0.0
    for pr in procs:
        _, status, usage = os.wait4(pr.pid, 0)
        pr.returncode = os.waitstatus_to_exitcode(status)
        if pr.returncode != 0:
            raise RuntimeError(f"writer {pr.args} failed")
        cpu += usage.ru_utime + usage.ru_stime
        rss = max(rss, usage.ru_maxrss * 1024)
    rows["write"] = {"wall": time.perf_counter() - t0, "cpu": cpu, "rss": rss}
    rows["write"]["rate"] = args.videos / rows["write"]["wall"]
    print(f"write done: {rows['write']['rate']:.0f} videos/s", flush=True)
    rows["open+list+info"] = run_measured(child("open", store, args))
    rows["scan"] = run_measured(child("scan", store, args))
    rows["scan"]["rate"] = rows["scan"]["videos"] / rows["scan"]["seconds"]
    rows["node cache"] = run_measured(child("cache", store, args))
    if not args.skip_train:
        rows["train (memory)"] = train(store, base / "run-memory", args, None)
        rows["train (streamed)"] = train(store, base / "run-streamed", args, args.budget)

    print_rows(rows, args)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


def print_rows(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(f"| step ({args.videos} videos) | wall s | CPU s | peak RSS | rate |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, r in rows.items():
        rate = {
            "write": f"{r.get('rate', 0):.0f} videos/s",
            "open+list+info": f"{r.get('seconds', 0):.3f} s (best of 3)",
            "scan": f"{r.get('rate', 0):.0f} videos/s",
            "node cache": f"{gib(r.get('bytes', 0))} built in {r.get('seconds', 0):.1f} s",
        }.get(name, f"{r.get('epoch', 0):.1f} s/epoch, data {r.get('data', 0):.1f} s")
        if r.get("index") is not None:
            rate += f", index {r['index']:.1f} s (dim {r['index_dim']})"
        print(f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {gib(r['rss'])} | {rate} |")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"args": vars(args), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
