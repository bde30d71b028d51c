"""Benchmark the multiple-aggregation SVM on synthetic pyramid node means.

Each scale runs in its own process (so that its peak resident memory is its own): synthetic node
means for ``n`` training and ``n_test`` test videos, ``C`` classes, depth ``D`` (M = 2^D - 1
nodes), ``d`` features; then ``MultipleAggregationSVM`` fitted to a relative gap of ``--eps``, and
a uniform-beta SVM (one alpha-step, beta = 1/M) on the same data for comparison.

The data has a pyramid's structure: 2^(D-1) leaf segments per video, each node the mean of its
leaves. Every leaf holds a video-specific offset, leaf noise and a weak class signal; the leaves of
the second quarter of the video also hold a strong class signal. The nodes covering that quarter
are the informative ones, so learning beta matters: a uniform beta drowns them among the others.

    python benchmarks/svm.py                      # small and medium scales, a few minutes
    python benchmarks/svm.py --scales 9500:6:2048:101 --n-test 2000   # UCF101 scale

Columns: seconds to the gap (and in the kernel, the SVMs and the beta-step), iterations (each one
C SVMs), node Gram matrices computed, peak RSS of the process (data included; the data alone is
``data GiB``), top-1 of the learned and of the uniform beta on the test videos.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
import warnings
from typing import Any

import numpy as np

DEFAULT_SCALES = "1000:4:512:20,1000:6:512:20,2000:6:512:101,4000:6:512:101"


def synthetic_nodes(
    n: int,
    depth: int,
    d: int,
    n_classes: int,
    seed: int,
    *,
    dtype: str = "float32",
    signal: float = 1.0,
    offset: float = 2.0,
    noise: float = 6.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``([n, 2^D - 1, d] node means, [n] labels)``; built leaf block by leaf block in place.

    Class signals shrink as 1/sqrt(d) (times ``signal``) so that the task is about as hard for
    every d: a linear classifier's margin grows with sqrt(d) at a fixed per-coordinate signal."""
    rng = np.random.default_rng(seed)
    m_nodes, leaves = (1 << depth) - 1, 1 << (depth - 1)
    y = rng.permutation(np.arange(n) % n_classes)
    scale = signal * np.sqrt(512 / d) / np.sqrt(d)
    strong = 0.7 * scale * rng.normal(size=(n_classes, d)).astype(np.float32)
    faint = 0.15 * scale * rng.normal(size=(n_classes, d)).astype(np.float32)
    lo, hi = leaves // 4, max(leaves // 2, leaves // 4 + 1)  # the second quarter
    X = np.empty((n, m_nodes, d), dtype=dtype)
    for start in range(0, n, 256):
        rows = slice(start, min(n, start + 256))
        k = rows.stop - rows.start
        leaf = rng.standard_normal((k, leaves, d), dtype=np.float32) * (noise / np.sqrt(d))
        leaf += rng.standard_normal((k, 1, d), dtype=np.float32) * (offset / np.sqrt(d))
        leaf += faint[y[rows]][:, None, :]
        leaf[:, lo:hi] += strong[y[rows]][:, None, :]
        block = np.empty((k, m_nodes, d), dtype=np.float32)
        block[:, leaves - 1 :] = leaf
        for level in range(depth - 1, 0, -1):  # parents are the means of their two children
            first, count, child = (1 << (level - 1)) - 1, 1 << (level - 1), (1 << level) - 1
            block[:, first : first + count] = 0.5 * (
                block[:, child : child + 2 * count : 2]
                + block[:, child + 1 : child + 2 * count : 2]
            )
        X[rows] = block
    return X, y


def run_one(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.exceptions import ConvergenceWarning

    from aggregator.svm import MultipleAggregationSVM

    n, depth, d, n_classes = (int(v) for v in spec.split(":"))
    n_test = args.n_test or max(n_classes, n // 2)
    t0 = time.perf_counter()
    X, y = synthetic_nodes(
        n + n_test, depth, d, n_classes, args.seed, dtype=args.dtype, signal=args.signal
    )
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
    data_s = time.perf_counter() - t0
    params = {
        "eps": args.eps,
        "max_iter": args.max_iter,
        "beta_step": args.beta_step,
        "gram_cache_gib": args.gram_cache_gib,
        "n_jobs": args.n_jobs,
    }
    t0, c0 = time.perf_counter(), time.process_time()
    est = MultipleAggregationSVM(**params).fit(Xtr, ytr)
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    top1 = float((est.predict(Xte) == yte).mean())
    hist = est.history_
    row: dict[str, Any] = {
        "n": n,
        "M": X.shape[1],
        "d": d,
        "C": n_classes,
        "n_test": n_test,
        "dtype": args.dtype,
        "beta_step": args.beta_step,
        "data_gib": X.nbytes / 2**30,
        "data_s": data_s,
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu_s,
        "iters": est.n_iter_,
        "gap": est.gap_,
        "kernel_s": sum(h["kernel_seconds"] for h in hist),
        "svm_s": sum(h["svm_seconds"] for h in hist),
        "step_s": sum(h["beta_step_seconds"] for h in hist),
        "first_iter_s": hist[0]["seconds"],
        "grams": sum(h["node_grams_computed"] for h in hist),
        "active": int((est.beta_ > 0).sum()),
        "top_nodes": [int(i) for i in np.argsort(-est.beta_)[:4]],
        "top1_learned": top1,
    }
    if not args.no_uniform:
        del est
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # one iteration on purpose: beta stays uniform
            warnings.simplefilter("ignore", ConvergenceWarning)
            uniform = MultipleAggregationSVM(**{**params, "max_iter": 1}).fit(Xtr, ytr)
        row["uniform_s"] = time.perf_counter() - t0
        row["top1_uniform"] = float((uniform.predict(Xte) == yte).mean())
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| n | M | d | C | data GiB | fit s | fit CPU s | kernel s | SVMs s | beta-step s "
        "| iters | gap | node Grams | active nodes | peak RSS GiB | top-1 learned "
        "| top-1 uniform | uniform s |"
    )
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['spec']} | failed: {r['error']} |")
            continue
        uniform = f"{r['top1_uniform']:.3f}" if "top1_uniform" in r else "-"
        uniform_s = f"{r['uniform_s']:.1f}" if "uniform_s" in r else "-"
        lines.append(
            f"| {r['n']} | {r['M']} | {r['d']} | {r['C']} | {r['data_gib']:.2f} | {r['fit_s']:.1f} "
            f"| {r['fit_cpu_s']:.1f} "
            f"| {r['kernel_s']:.1f} | {r['svm_s']:.1f} | {r['step_s']:.1f} | {r['iters']} "
            f"| {r['gap']:.1e} | {r['grams']} | {r['active']} | {r['peak_rss_gib']:.2f} "
            f"| {r['top1_learned']:.3f} | {uniform} | {uniform_s} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scales", default=DEFAULT_SCALES, help="comma list of n:D:d:C")
    p.add_argument("--n-test", type=int, default=0, help="test videos (default: max(C, n/2))")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--beta-step", choices=("level", "lp"), default="level")
    p.add_argument("--gram-cache-gib", type=float, default=4.0)
    p.add_argument("--n-jobs", type=int, default=1)
    p.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float16",
        help="node features as stored (the node cache holds float16)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signal", type=float, default=1.0, help="class signal strength (x 1/sqrt(d))")
    p.add_argument("--no-uniform", action="store_true", help="skip the uniform-beta SVM")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per scale")
    p.add_argument("--verbose", action="store_true", help="log every iteration to stderr")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        if args.verbose:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        print(json.dumps(run_one(args.one, args)))
        return 0
    rows = []
    for spec in args.scales.split(","):
        cmd = [sys.executable, __file__, "--one", spec, *sys.argv[1:]]
        try:
            done = subprocess.run(  # the child's log goes straight to stderr
                cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout, check=False
            )
        except subprocess.TimeoutExpired:
            rows.append({"spec": spec, "error": f"over {args.timeout:.0f} s"})
            continue
        if done.returncode != 0:
            rows.append({"spec": spec, "error": f"exit status {done.returncode} (see stderr)"})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
