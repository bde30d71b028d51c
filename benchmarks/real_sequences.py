"""Every head with default options on real, variable-length sequence classification datasets.

The datasets ship inside sktime's wheel (``pip install framepool[bench]``; nothing is downloaded
at run time) with their official train/test splits: JapaneseVowels (12 cepstrum coefficients per
frame, 9 speakers, 7 to 29 frames) and PLAID (appliance current, 11 appliances, 100 to 1,344
frames) have sequences of varying length; BasicMotions (6 accelerometer/gyroscope channels),
ArrowHead, OSULeaf and ACSF1 have one length per dataset. Each sequence is written into a
FeatureStore through its public API as one "video" with a ``[T, d]`` ``appearance`` stream, and
each head is trained by the same code as ``framepool train`` with default options. The table
gives each head's test top-1 beside the two linear-probe references of the same run
(standardised logistic regression on the global mean and on the node means of a 4-level
pyramid) and the seconds per head.

    python benchmarks/real_sequences.py                       # all datasets, all heads
    python benchmarks/real_sequences.py --datasets JapaneseVowels --heads gap,tp-concat
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib.resources
import logging
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.svm.run import train_svm
from aggregator.train import train_run
from storage import FeatureStore

DATASETS = ("JapaneseVowels", "PLAID", "BasicMotions", "ArrowHead", "OSULeaf", "ACSF1")
HEADS: dict[str, tuple[str, dict[str, Any]]] = {
    "gap": ("gap", {}),
    "max": ("max", {}),
    "tp-concat": ("tp", {"variant": "concat"}),
    "tp-average": ("tp", {"variant": "average"}),
    "tpp": ("tpp", {}),
    "datp": ("datp", {}),
    "stcb": ("stcb", {}),
    "svm": ("svm", {}),
}


@dataclass
class Dataset:
    name: str
    train: list[np.ndarray]
    y_train: list[str]
    test: list[np.ndarray]
    y_test: list[str]

    @property
    def lengths(self) -> tuple[int, int]:
        t = [len(x) for x in self.train + self.test]
        return min(t), max(t)


def load_dataset(name: str) -> Dataset:
    """A dataset from the ``.ts`` files in sktime's wheel: ``[T, d]`` arrays and labels."""
    try:
        import sktime.datasets as sk_datasets
        from sktime.datasets import load_from_tsfile_to_dataframe
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("this benchmark needs sktime: pip install 'framepool[bench]'") from exc
    base = importlib.resources.files(sk_datasets) / "data" / name
    parts = []
    for split in ("TRAIN", "TEST"):
        path = base / f"{name}_{split}.ts"
        if not path.is_file():
            raise SystemExit(f"{name}: {path} is not in the installed sktime")
        frame, labels = load_from_tsfile_to_dataframe(str(path))
        seqs = [
            np.stack(
                [np.asarray(frame.iloc[i, j], dtype=np.float32) for j in range(frame.shape[1])], 1
            )
            for i in range(len(frame))
        ]
        parts.append((seqs, [str(v) for v in labels]))
    return Dataset(name, parts[0][0], parts[0][1], parts[1][0], parts[1][1])


def write_store(data: Dataset, path: Path) -> None:
    """One video per sequence, ``appearance`` = the sequence, split = the official one."""
    store = FeatureStore.create(
        path,
        extractor={"appearance": {"backbone": "raw", "dataset": data.name}},
        class_names=sorted(set(data.y_train) | set(data.y_test)),
    )
    for split, seqs, labels in (
        ("train", data.train, data.y_train),
        ("test", data.test, data.y_test),
    ):
        for i, (x, y) in enumerate(zip(seqs, labels, strict=True)):
            store.write_video(f"{split}_{i:04d}", {"appearance": x}, label=y, split=split)


def run_head(key: str, store: Path, out: Path, threads: int) -> dict[str, Any]:
    head, kwargs = HEADS[key]
    if head == "svm":  # the defaults of `framepool train --head svm`
        return train_svm(
            store,
            out,
            streams=["appearance"],
            levels=6,
            variant="concat",
            C=None,
            kernel="linear",
            train_split="train",
            test_split="test",
            seed=0,
            max_iter=50,
            eps=1e-3,
        )
    return train_run(
        store,
        out,
        head=head,
        streams=("appearance",),
        head_kwargs=kwargs,
        device="cpu",
        threads=threads,
        make_plots=False,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--work", help="keep the stores and runs here (default: a temporary folder)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise SystemExit(f"unknown heads {unknown}; known: {list(HEADS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="framepool-seq-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all, c_all = time.perf_counter(), time.process_time()
    results: dict[str, dict[str, Any]] = {}
    shapes: dict[str, str] = {}
    n_classes: dict[str, int] = {}
    try:
        for name in datasets:
            data = load_dataset(name)
            store = work / f"{name}.zarr"
            if store.exists():
                shutil.rmtree(store)
            write_store(data, store)
            lo, hi = data.lengths
            n_classes[name] = len(set(data.y_train) | set(data.y_test))
            shapes[name] = (
                f"{len(data.train)}/{len(data.test)}, d={data.train[0].shape[1]}, T={lo}"
                + (f"-{hi}" if hi != lo else "")
                + f", {len(set(data.y_train))} classes"
            )
            results[name] = {}
            for key in heads:
                t0, c0 = time.perf_counter(), time.process_time()
                m = run_head(key, store, work / "runs" / name / key, args.threads)
                results[name][key] = {
                    "top1": m["top1"],
                    "probe": m.get("probe") or {},
                    "seconds": time.perf_counter() - t0,
                    "cpu": time.process_time() - c0,
                }
                probe = m.get("probe") or {}
                print(
                    f"{name:15s} {key:11s} top1 {100 * m['top1']:6.2f}  probes "
                    f"{100 * probe['global_mean']['top1']:6.2f} / "
                    f"{100 * probe['pyramid_nodes']['top1']:6.2f}  "
                    f"{results[name][key]['seconds']:6.1f} s",
                    flush=True,
                )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    wall, cpu = time.perf_counter() - t_all, time.process_time() - c_all
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print()
    print(
        "Test top-1 (%) with default options; probes: standardised logistic regression on the "
        "global mean | on the 4-level pyramid node means. Seconds per head (wall) in brackets."
    )
    print()
    print(
        "| dataset (train/test, d, T, classes) | probe: mean | probe: nodes | "
        + " | ".join(heads)
        + " |"
    )
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in heads) + " |")
    for name in datasets:
        r = results[name]
        first = r[heads[0]]["probe"]
        cells = [f"{100 * r[h]['top1']:.1f} ({r[h]['seconds']:.0f} s)" for h in heads]
        print(
            f"| {name} ({shapes[name]}) | {100 * first['global_mean']['top1']:.1f} | "
            f"{100 * first['pyramid_nodes']['top1']:.1f} | " + " | ".join(cells) + " |"
        )
    print()
    print(check_targets(results, heads, n_classes))
    print()
    print(
        f"wall {wall:.0f} s, CPU {cpu:.0f} s, peak RSS {rss:.0f} MiB; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} torch thread(s) per run, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def check_targets(
    results: dict[str, dict[str, Any]], heads: list[str], n_classes: dict[str, int]
) -> str:
    """The goals, checked: gap within 2 points of the global-mean probe on every dataset; tp and
    svm at or above the node-mean probe minus 2 points on average and never 5 below; every head
    above chance."""
    lines = []
    for name, r in results.items():
        chance = 1.0 / n_classes[name]
        for h, v in r.items():
            if v["top1"] < chance:
                lines.append(
                    f"FAIL {name} {h}: {100 * v['top1']:.1f} below chance ({100 * chance:.1f})"
                )
        if "gap" in r:
            d = r["gap"]["top1"] - r["gap"]["probe"]["global_mean"]["top1"]
            if d < -0.02 - 1e-9:
                lines.append(
                    f"FAIL {name} gap: {100 * d:+.1f} points against the global-mean probe"
                )
    for h in ("tp-concat", "tp-average", "svm"):
        if h not in heads:
            continue
        diffs = {
            n: r[h]["top1"] - r[h]["probe"]["pyramid_nodes"]["top1"] for n, r in results.items()
        }
        mean = float(np.mean(list(diffs.values())))
        worst = min(diffs, key=lambda n: diffs[n])
        ok = mean >= -0.02 - 1e-9 and diffs[worst] >= -0.05 - 1e-9  # 0.80 - 0.85 is -0.0500...04
        lines.append(
            f"{'ok  ' if ok else 'FAIL'} {h}: {100 * mean:+.1f} points against the node-mean probe "
            f"on average, worst {100 * diffs[worst]:+.1f} ({worst})"
        )
    return "\n".join(lines) if lines else "all targets met"


if __name__ == "__main__":
    main()
