"""Which videos a run trains and tests on, their labels, and the parts held out for validation.

A split is a video's ``split`` attribute or a part of an imported split list
(:func:`split_videos`); labels become class indices (:func:`label_indices`); the validation part
is a stratified share of every class (:func:`stratified_holdout`) or folds of whole groups
(:func:`grouped_holdout`, the groups from :func:`video_groups`).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence

import numpy as np

from storage import FeatureStore

log = logging.getLogger(__name__)


def label_indices(
    store: FeatureStore, video_ids: Sequence[str], class_names: list[str]
) -> np.ndarray:
    """``[n]`` int64 class index of each video's label in ``class_names``."""
    index = {c: i for i, c in enumerate(class_names)}
    out = np.empty(len(video_ids), dtype=np.int64)
    for i, (vid, label) in enumerate(zip(video_ids, store.labels(list(video_ids)), strict=True)):
        if label not in index:
            raise ValueError(
                f"video {vid!r} has label {label!r}, which is not among the store's class names"
            )
        out[i] = index[label]
    return out


def split_videos(store: FeatureStore, split: str) -> list[str]:
    """Complete videos of ``split`` (a video's ``split`` attr or ``<list>/<part>``); never empty."""
    ids = store.videos(split=split)
    if not ids:
        known = sorted(store.info()["videos_per_split"]) + [
            f"{name}/{part}" for name, parts in store.split_lists().items() for part in parts
        ]
        if not known:
            raise ValueError(
                f"the store {store.path} has no splits, so split {split} is empty: give "
                "framepool extract a labels CSV with a split column (path,label,split), or "
                "import split lists with framepool store import-splits"
            )
        raise ValueError(
            f"split {split} has no complete video in {store.path}; its splits: {', '.join(known)}"
        )
    return ids


def stratified_holdout(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, validation)`` with about ``fraction`` of every class held out.

    A class with at least two videos gives at least one to validation and keeps at least one;
    a class with a single video keeps it for training. Seeded, so the same labels and seed give
    the same partition.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = round(fraction * len(idx))
        k = min(max(k, 1), len(idx) - 1) if fraction > 0 and len(idx) >= 2 else 0
        val.append(idx[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx.astype(np.int64), val_idx.astype(np.int64)


def grouped_holdout(
    labels: np.ndarray, groups: Sequence[str], fraction: float, seed: int
) -> list[np.ndarray]:
    """Folds of whole groups: index arrays, each holding about ``fraction`` of the videos (at
    most one fold per group), classes kept as even across folds as groups allow
    (scikit-learn's ``StratifiedGroupKFold``, shuffled with ``seed``). Fold 0 is the validation
    part; the others serve as further selection folds. Fewer than two groups give no fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} videos")
    n_groups = len(set(groups))
    if fraction == 0 or n_groups < 2:
        return []
    k = min(n_groups, max(2, round(1.0 / fraction)))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has fewer members than k"
        warnings.simplefilter("ignore", UserWarning)
        folds = [np.sort(val) for _, val in splitter.split(np.zeros(len(labels)), labels, groups)]
    return [f.astype(np.int64) for f in folds if len(f)]


def video_groups(
    store: FeatureStore, video_ids: Sequence[str], val_groups: str
) -> tuple[list[str] | None, str | None]:
    """The group of every video of ``video_ids`` for a grouped validation split, and where the
    groups came from (``"store"`` or the pattern); ``(None, None)`` for a random split.

    ``val_groups``: ``auto`` uses the groups stored with the videos when every video has one
    (a warning when only some do); ``none`` never groups; anything else is a regular
    expression searched in each video id, whose first capture group (or whole match) is the
    group, e.g. ``_(g[0-9]+)_`` for UCF101's ``v_<Class>_g08_c01``.
    """
    if val_groups == "none":
        return None, None
    if val_groups == "auto":
        stored = store.groups(list(video_ids))
        missing = sum(g is None for g in stored)
        if missing == len(stored):
            return None, None
        if missing:
            first = next(v for v, g in zip(video_ids, stored, strict=True) if g is None)
            log.warning(
                "%d of %d training videos have no group (first: %s): validation is drawn at "
                "random, not by group",
                missing,
                len(stored),
                first,
            )
            return None, None
        return [str(g) for g in stored], "store"
    try:
        pattern = re.compile(val_groups)
    except re.error as exc:
        raise ValueError(f"val_groups {val_groups!r} is not a regular expression: {exc}") from exc
    out = []
    for vid in video_ids:
        m = pattern.search(vid)
        if m is None:
            raise ValueError(
                f"val_groups pattern {val_groups!r} does not match video id {vid!r}; every "
                "training video needs a group"
            )
        out.append(m.group(1) if pattern.groups else m.group(0))
    return out, val_groups
