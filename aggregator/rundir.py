"""The run directory, one definition for every trainer (deep heads, the SVM, fine-tuning).

A run directory holds ``config.json`` (what rebuilds and reruns the model), ``model.pt``
(weights, loadable with ``torch.load(weights_only=True)``), ``metrics.json`` and PNG plots. Files
are written atomically (a temporary file renamed over the target), JSON strictly (NaN and
infinities become ``null``). The run id is the directory name plus a hash of the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage import FeatureStore

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
RUN_FORMAT = "framepool-run/1"


def learned_fusion_rule(config: Mapping[str, Any]) -> str:
    """What a run's learned fusion weights mix: ``probabilities`` (recorded as ``fusion_rule``
    in ``config.json``) or ``logits`` for runs written before probability fusion, which record
    neither ``fusion_rule`` nor ``standardize`` (both came with it)."""
    rule = config.get("fusion_rule")
    if rule is not None:
        if rule not in ("probabilities", "logits"):
            raise ValueError(f"fusion_rule must be 'probabilities' or 'logits', got {rule!r}")
        return str(rule)
    return "probabilities" if "standardize" in config else "logits"


def finite(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars and arrays -> Python, tuples -> lists, paths -> strings
    (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as strict JSON, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite(payload), indent=2, allow_nan=False))
    os.replace(tmp, path)


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_run_id(out: str | Path, config: Mapping[str, Any]) -> str:
    """``<directory name>-<8 hex digits of the config's hash>``."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return f"{Path(out).resolve().name}-{digest[:8]}"


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``config.json``; a missing file names the directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE})")
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or "head" not in config:
        raise ValueError(f"{str(path)!r} is not a framepool run config (no 'head')")
    return config


def read_model_state(run_dir: str | Path) -> Any:
    """The run's ``model.pt`` on the CPU (``weights_only``: tensors and plain values); a missing
    file names the directory."""
    weights = Path(run_dir) / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} has no {MODEL_FILE}")
    return torch.load(weights, map_location="cpu", weights_only=True)


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no {METRICS_FILE}")
    metrics = json.loads(path.read_text())
    if not isinstance(metrics, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object")
    return metrics


def evaluation_file(split: str) -> str:
    """``evaluation-<split>.json`` with the split name made file-safe."""
    return "evaluation-" + re.sub(r"[^A-Za-z0-9._-]+", "_", split) + ".json"


def store_location(store: FeatureStore) -> str:
    """The store's URL, or its absolute path."""
    return store.path if "://" in store.path else os.path.abspath(store.path)


def resolve_splits(
    store: FeatureStore, train_split: str, test_split: str | None
) -> tuple[list[str], list[str]]:
    """Complete videos of the training and test splits (no test split: none); the splits must
    not share a video."""
    from aggregator.splits import split_videos

    train_ids = split_videos(store, train_split)
    test_ids = split_videos(store, test_split) if test_split else []
    overlap = sorted(set(train_ids) & set(test_ids))
    if overlap:
        raise ValueError(
            f"splits {train_split!r} and {test_split!r} share {len(overlap)} videos, "
            f"e.g. {overlap[0]!r}"
        )
    return train_ids, test_ids


def check_streams(store: FeatureStore, streams: Sequence[str], video_id: str) -> None:
    """Every stream of ``streams`` is in the store (checked on ``video_id``)."""
    have = store.streams(video_id)
    for s in streams:
        if s not in have:
            raise ValueError(
                f"stream {s!r} is not in store {store.path!r}; video {video_id!r} has {have}"
            )


@dataclass(frozen=True)
class LabelledSplits:
    """A run's videos: the training split (its fit and validation parts) and the test split,
    with the split names, validation fraction and seed that chose them."""

    train_split: str
    test_split: str | None
    val_fraction: float
    seed: int
    class_names: list[str]
    train_ids: list[str]
    test_ids: list[str]
    y_train: np.ndarray
    y_test: np.ndarray
    fit_idx: np.ndarray
    val_idx: np.ndarray
    group_by: str | None = None  # "store", a pattern on video ids, or None (random validation)
    n_groups: int = 0
    more_folds: tuple[np.ndarray, ...] = ()  # further validation folds of whole groups

    @property
    def fit_ids(self) -> list[str]:
        return [self.train_ids[i] for i in self.fit_idx]

    @property
    def val_ids(self) -> list[str]:
        return [self.train_ids[i] for i in self.val_idx]

    @property
    def y_fit(self) -> np.ndarray:
        return self.y_train[self.fit_idx]

    @property
    def y_val(self) -> np.ndarray:
        return self.y_train[self.val_idx]

    @property
    def classes(self) -> np.ndarray:
        """Every class of the training split: one with a single video keeps it for fitting
        (:func:`aggregator.splits.stratified_holdout`)."""
        return np.unique(self.y_fit)


def further_folds(
    labels: np.ndarray,
    fit: np.ndarray,
    val: np.ndarray,
    group_folds: Sequence[np.ndarray] | None,
    *,
    min_validation: int,
    max_folds: int,
    seed: int = 0,
) -> list[np.ndarray]:
    """Validation folds after fold 0 (``val``, positions into ``labels``), added while the
    pooled validation videos are fewer than ``min_validation`` and the folds fewer than
    ``max_folds``: the next ``group_folds`` when validation holds out groups (positions too),
    else folds with ``val``'s count of every class, taken in turn from ``fit`` in its order
    (disjoint) and, once a class would have nothing left to fit on, from repeated seeded
    shuffles of every class's training videos (``fit`` and ``val``): repeated stratified
    folds, so that on a few videos per class the choice rests on every video, several times,
    rather than on the one or two a single split holds out. Every fold's fit part is the rest
    of the training videos."""
    out: list[np.ndarray] = []
    pooled = len(val)
    if group_folds is not None:
        for part in group_folds:
            if 1 + len(out) >= max_folds or pooled >= min_validation:
                break
            out.append(np.asarray(part))
            pooled += len(part)
        return out
    counts = dict(zip(*np.unique(labels[val], return_counts=True), strict=True))
    if not counts:
        return out
    by_class = {c: fit[labels[fit] == c] for c in counts}

    def wanted() -> bool:
        return 1 + len(out) < max_folds and pooled < min_validation

    k = 1
    while wanted():
        if any(k * n >= len(by_class[c]) for c, n in counts.items()):
            break  # a class would have nothing left to fit on
        out.append(np.concatenate([by_class[c][(k - 1) * n : k * n] for c, n in counts.items()]))
        pooled += len(val)
        k += 1
    every = np.concatenate([fit, val])
    rng = np.random.default_rng(seed)
    while wanted():  # repeats: a fresh shuffle of every class, cut into folds of val's counts
        shuffled = {c: rng.permutation(every[labels[every] == c]) for c in counts}
        j = 0
        while wanted() and all((j + 1) * n < len(shuffled[c]) for c, n in counts.items()):
            parts = [shuffled[c][j * n : (j + 1) * n] for c, n in counts.items()]
            out.append(np.concatenate(parts))
            pooled += len(val)
            j += 1
        if j == 0:
            break  # no class can give a fold and keep a video to fit on
    return out


def labelled_splits(
    store: FeatureStore,
    train_split: str,
    test_split: str | None,
    *,
    val_fraction: float,
    seed: int,
    streams: Sequence[str] | None = None,
    val_groups: str = "auto",
) -> LabelledSplits:
    """The labelled videos of the two splits (:func:`resolve_splits`) and a seeded validation
    part of the training split; ``streams`` (when given) must be in the store.

    The validation part holds out whole groups when the videos have them
    (:func:`aggregator.splits.video_groups`): videos of one subject or session on both sides
    would score the validation on faces and rooms the model has seen, and choose for that.
    Otherwise it is a stratified share of every class."""
    from aggregator.splits import grouped_holdout, label_indices, stratified_holdout, video_groups

    class_names = store.class_names
    if not class_names:
        raise ValueError(f"store {store.path!r} has no class names (no labelled video)")
    train_ids, test_ids = resolve_splits(store, train_split, test_split)
    if streams is not None:
        check_streams(store, streams, train_ids[0])
    y_train = label_indices(store, train_ids, class_names)
    y_test = label_indices(store, test_ids, class_names)
    groups, group_by = video_groups(store, train_ids, val_groups)
    folds = grouped_holdout(y_train, groups, val_fraction, seed) if groups is not None else []
    if groups is not None and not folds and val_fraction > 0:
        log.warning(
            "the training videos form %d group(s) (%s): validation is drawn at random",
            len(set(groups)),
            group_by,
        )
    if folds:
        val_idx = folds[0]
        fit_idx = np.setdiff1d(np.arange(len(train_ids)), val_idx).astype(np.int64)
    else:
        fit_idx, val_idx = stratified_holdout(y_train, val_fraction, seed)
        group_by = None
    return LabelledSplits(
        train_split=train_split,
        test_split=test_split,
        val_fraction=val_fraction,
        seed=seed,
        class_names=class_names,
        train_ids=train_ids,
        test_ids=test_ids,
        y_train=y_train,
        y_test=y_test,
        fit_idx=fit_idx,
        val_idx=val_idx,
        group_by=group_by,
        n_groups=len(set(groups)) if groups is not None and group_by is not None else 0,
        more_folds=tuple(folds[1:]),
    )


def make_run_config(
    out: str | Path,
    store: FeatureStore,
    head: str,
    model_fields: Mapping[str, Any],
    *,
    extractor: Mapping[str, Any],
    splits: LabelledSplits,
    train_args: Mapping[str, Any],
) -> dict[str, Any]:
    """A run's ``config.json``: the format, ``head`` and ``model_fields`` (what rebuilds the
    model), where the features came from, the splits, and the trainer's arguments; with its run
    id."""
    config: dict[str, Any] = {
        "format": RUN_FORMAT,
        "head": head,
        **model_fields,
        "store": store_location(store),
        "extractor": dict(extractor),
        "class_names": splits.class_names,
        "splits": {
            "train": splits.train_split,
            "test": splits.test_split,
            "val_fraction": splits.val_fraction,
            "val_groups": splits.group_by,
            "n_groups": splits.n_groups,
            "validation_ids": splits.val_ids,
        },
        "seed": splits.seed,
        "train_args": train_args,
    }
    config["run_id"] = make_run_id(out, config)
    return config


def write_metrics(out: Path, metrics: Mapping[str, Any], t_start: float) -> dict[str, Any]:
    """Add the run's total ``seconds`` (since ``t_start``, a ``time.perf_counter()``) and write
    ``metrics.json`` last, so a complete metrics file means a complete run; return what was
    written."""
    written: dict[str, Any] = finite({**metrics, "seconds": time.perf_counter() - t_start})
    write_json(out / METRICS_FILE, written)
    return written
