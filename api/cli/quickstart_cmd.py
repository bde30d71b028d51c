"""``framepool quickstart``: the whole path on a small local demo, no arguments needed.

1. generate labelled clips whose classes differ only in the temporal order of their motion;
2. extract both streams of those clips and of the real clips (when found) into a local store;
3. train ``gap`` and ``tp`` on the demo and compare them;
4. serve the ``tp`` run for a moment, send it one clip, print the answer and the curl command.

The defaults are a demo scale chosen to finish in about two minutes on two cores: a ResNet-18
instead of ResNet-101, every 2nd frame of the generated clips, and 8 frames of each real clip.
The run says so, and prints the full-size command (:data:`FULL_SIZE`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from api.cli.options import RESNET_ARCHS
from api.cli.store_cmd import format_info

DEFAULT_DIR = Path("framepool-demo")
FULL_SIZE = "framepool quickstart --arch resnet101 --stride 1 --per-class 12 --real-max-frames 0"
_REPO_CLIPS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "quickstart",
        help="run the whole path on a small local demo",
        description="The whole path on a small local demo, no arguments needed: generate clips "
        "whose two classes differ only in the temporal order of their motion, extract both "
        "streams of them (and of the real clips, when found) into a local store, train gap and "
        "tp on the demo and compare them, then serve the tp run for a moment and send it a clip.",
    )
    p.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"demo folder (default: ./{DEFAULT_DIR})"
    )
    p.add_argument(
        "--real-clips",
        type=Path,
        default=None,
        help="folder of real clips to extract beside the generated ones (default: "
        "$FRAMEPOOL_REAL_CLIPS, or shared/data/videos beside the source tree when present)",
    )
    p.add_argument(
        "--real-max-frames",
        type=int,
        default=8,
        help="frames kept per real clip (evenly spaced) to keep the demo short; 0 keeps all",
    )
    p.add_argument(
        "--arch",
        default="resnet18",
        choices=RESNET_ARCHS,
        help="backbone of both streams (resnet101 is the full size)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="imagenet, random or a state-dict path (default: imagenet when torchvision's "
        "cache has it, else random, said out loud)",
    )
    p.add_argument("--per-class", type=int, default=10, help="generated clips per class")
    p.add_argument(
        "--stride", type=int, default=2, help="keep every N-th frame of the generated clips"
    )
    p.add_argument("--epochs", type=int, default=100, help="training epochs of each head")
    p.add_argument("--no-serve", action="store_true", help="skip the serving step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def _real_clips_dir(arg: Path | None) -> Path | None:
    if arg is not None:
        if not arg.is_dir():
            raise FileNotFoundError(f"--real-clips {str(arg)!r} is not a folder")
        return arg
    env = os.environ.get("FRAMEPOOL_REAL_CLIPS")
    if env:
        return Path(env) if Path(env).is_dir() else None
    return _REPO_CLIPS if _REPO_CLIPS.is_dir() else None


def _choose_weights(arg: str | None, arch: str) -> str:
    if arg is not None:
        return arg
    from extractor.backbones import imagenet_checkpoint

    try:
        imagenet_checkpoint(arch, download=False)  # the demo never needs the network
    except FileNotFoundError:
        print(
            f"  no ImageNet {arch} weights in torchvision's cache: using --weights random "
            "(features are then only good for this demo)"
        )
        return "random"
    return "imagenet"


def _nth(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _step(title: str) -> float:
    print(f"\n== {title}")
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    root: Path = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    store_path = root / "store.zarr"
    real_frames = f"{args.real_max_frames} frames" if args.real_max_frames else "every frame"
    print(
        f"Demo scale: {args.arch}, every {_nth(args.stride)} frame of {2 * args.per_class} "
        f"generated clips, {real_frames} of each real clip.\nFull size: {FULL_SIZE}"
    )
    by_class, labels_csv = _demo_clips(root, args.per_class)
    real = _extract(args, root, labels_csv, store_path)
    _train(args, root, store_path)
    if args.no_serve:
        print(f"\nquickstart finished in {time.perf_counter() - started:.0f} s")
        return 0
    from aggregator.similarity import build_index
    from api.service.demo import demo_request

    _step("4/4 serving the tp run for a moment and sending it one clip")
    build_index(root / "runs" / "tp", store_path, split="train")
    clip = real[0] if real else sorted(by_class[sorted(by_class)[0]])[0]
    answer = demo_request(root / "runs" / "tp", clip, store=store_path)
    print(f"  POST {clip.name} -> HTTP {answer['status']}")
    print(json.dumps(answer["response"], indent=2))
    print("\nTo serve it yourself:")
    print(f"  framepool serve --run {root / 'runs' / 'tp'} --store {store_path}")
    print(f"  {answer['curl']}")
    print(f"\nquickstart finished in {time.perf_counter() - started:.0f} s")
    return 0 if answer["status"] == 200 else 1


def _demo_clips(root: Path, per_class: int) -> tuple[dict[str, list[Path]], Path]:
    """Step 1: the generated clips by class, and ``root/labels.csv`` (30 % of each class test)."""
    from extractor.synthetic import make_demo_clips

    t0 = _step(f"1/4 generating demo clips in {root / 'clips'}")
    # 10 still frames (the flow stack length) around each excursion: only the order differs
    clips = make_demo_clips(root / "clips", n_per_class=per_class, n_frames=54, rest=10)
    by_class: dict[str, list[Path]] = {}
    for path, label in clips:
        by_class.setdefault(label, []).append(path)
    labels_csv = root / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for label, paths in sorted(by_class.items()):
            n_test = max(1, len(paths) * 3 // 10)
            for i, path in enumerate(sorted(paths)):
                writer.writerow([str(path), label, "test" if i < n_test else "train"])
    print(
        f"  {len(clips)} clips, classes: {', '.join(sorted(by_class))} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return by_class, labels_csv


def _extract(
    args: argparse.Namespace, root: Path, labels_csv: Path, store_path: Path
) -> list[Path]:
    """Step 2: the demo clips and the real ones (unlabelled) into the store; the real clips."""
    from extractor.features import FeatureExtractor
    from extractor.pipeline import run_extraction
    from extractor.sources import make_sources
    from extractor.spec import BackboneSpec
    from storage import FeatureStore

    weights = _choose_weights(args.weights, args.arch)
    t0 = _step(f"2/4 extracting appearance + motion ({args.arch}, weights {weights})")
    extractor = FeatureExtractor(
        BackboneSpec(weights=weights, arch=args.arch, flow="dis"), device=args.device
    )
    summary = run_extraction(
        make_sources([root / "clips"], labels=labels_csv),
        store_path,
        extractor,
        stride=args.stride,
        progress=sys.stderr.isatty(),
    )
    print(summary.format())
    real_dir = _real_clips_dir(args.real_clips)
    real: list[Path] = []
    if real_dir is None:
        print("  no real clips found (pass --real-clips DIR to add some)")
    else:
        real = sorted(p for p in real_dir.iterdir() if p.suffix.lower() in {".mp4", ".avi"})
        max_frames = args.real_max_frames or None
        print(f"  + {len(real)} real clips from {real_dir} (at most {max_frames} frames each)")
        # Real clips carry no demo label: they are queries for the service, not training data.
        sources = [dataclasses.replace(s, label=None, split="real") for s in make_sources(real)]
        summary_real = run_extraction(
            sources, store_path, extractor, max_frames=max_frames, progress=sys.stderr.isatty()
        )
        print(summary_real.format())
    print(f"  ({time.perf_counter() - t0:.1f} s)\n")
    print(format_info(FeatureStore.open(store_path).info()))
    return real


def _train(args: argparse.Namespace, root: Path, store_path: Path) -> None:
    """Step 3: a gap and a tp head on the cached features, in ``root/runs``."""
    from aggregator.train import train_run

    t0 = _step("3/4 training pooling heads on the cached features")
    for head, kwargs in (("gap", {}), ("tp", {"depth": 3, "variant": "concat"})):
        metrics = train_run(
            store_path,
            root / "runs" / head,
            head=head,
            streams=("appearance", "motion"),
            head_kwargs=kwargs,
            epochs=args.epochs,
            batch_size=16,
            val_fraction=0.0,
            device=args.device,
            seed=0,
        )
        print(
            f"  {head:4s} top1 {metrics['top1']:.2f}  mean class acc "
            f"{metrics['mean_class_accuracy']:.2f}  ({metrics['seconds']:.1f} s)"
            + (f"  beta {json.dumps(metrics['beta'])}" if metrics.get("beta") else "")
        )
    print("  the classes differ only in temporal order: gap averages it away, the pyramid keeps it")
    print(f"  runs in {root / 'runs'} (metrics.json, plots)  ({time.perf_counter() - t0:.1f} s)")
