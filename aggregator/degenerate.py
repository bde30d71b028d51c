"""Inputs a head cannot learn from, refused before any training, and inputs on which a head
is weak, said in the run's warnings.

A stream is *constant* when every one of its features varies over the training videos' summaries
by at most :data:`aggregator.heads.standardize.MIN_STD` or, for features far from zero, by at
most :data:`RELATIVE_SPREAD` of their magnitude (a constant read back from float32 sums or the
float16 node cache varies by its rounding alone). Standardising such a stream divides rounding
noise by itself; no head can learn from it, so the run stops with an error naming the stream.

``stcb`` on streams that are all one-dimensional is refused too: the compact bilinear feature of
scalars is a single product, and the signed square root and L2 normalisation that follow leave
only its sign. ``datp`` on a one-dimensional stream does learn (its pooled feature is one
adaptively weighted mean per video, which separates classes that differ in it), but it sees
nothing of the sequence's shape: the run warns, so that a result near chance is not a mystery.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from aggregator.heads.standardize import MIN_STD

RELATIVE_SPREAD = 1e-5  # a spread below this share of a feature's magnitude is rounding


def constant_features(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[d]`` True where a feature with training ``mean`` and ``std`` is constant."""
    mean, std = mean.double().reshape(-1), std.double().reshape(-1)
    return std <= torch.clamp(RELATIVE_SPREAD * mean.abs(), min=MIN_STD)


def refuse_inputs(
    head: str,
    in_features: Mapping[str, int],
    stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    n_train: int,
) -> None:
    """A ``ValueError`` naming the stream and its problem when ``head`` cannot learn from the
    streams with training statistics ``stats`` (``{stream: (mean [d], std [d])}`` over the
    ``n_train`` training videos' summaries); nothing otherwise."""
    for s, (mean, std) in stats.items():
        if bool(constant_features(mean, std).all()):
            raise ValueError(
                f"stream {s!r} is constant over the {n_train} training videos: every one of its "
                f"{in_features[s]} features varies by at most {MIN_STD:g} or "
                f"{RELATIVE_SPREAD:g} of its magnitude (largest spread {float(std.max()):.3g}); "
                "no head can learn from it"
            )
    if head == "stcb" and all(d == 1 for d in in_features.values()):
        raise ValueError(
            f"head 'stcb' on one-dimensional streams {sorted(in_features)}: their compact "
            "bilinear feature is one product whose L2 normalisation leaves only its sign; "
            "use gap, tpp or tp on one-dimensional inputs"
        )


def input_warnings(head: str, in_features: Mapping[str, int]) -> list[str]:
    """Warnings for inputs on which ``head`` learns little by construction."""
    if head != "datp":
        return []
    return [
        f"stream {s!r} is one-dimensional: datp pools it into one weighted mean per video, "
        "which tells classes apart only where that mean differs between them; tp or tpp keep "
        "the sequence's shape"
        for s, d in in_features.items()
        if d == 1
    ]
