"""Fine-tuning core: the surrogate gradient over periodic frame subsets (the multiple
aggregation paper, Eq. 7).

Every frame of a video goes through the backbone in the forward pass, so the pooling head sees all
``T`` frame features. At epoch ``r`` only the frames of the periodic subset

    P_r = {t : t ≡ r (mod K)},   t = 0 .. T-1

carry gradient into the backbone; the others are computed under ``torch.no_grad`` (or read from a
feature store). Activation memory therefore scales with ``|P_r| ≈ T / K`` (or with one chunk when
``checkpoint=True``), and over ``K`` consecutive epochs every frame carries gradient exactly once.
``K = 1`` is the exact gradient of the unfolded model.

Scaling (a decision the paper leaves open). Written literally, Eq. 7 sums over ``t ∈ P_r`` only,
which makes the backbone gradient about ``1/K`` of the exact one while the head's gradient stays
exact: ``K`` would silently divide the backbone's learning rate. By default the gradient that flows
from a subset frame's feature into the backbone is multiplied by ``K`` (``grad_scale="unbiased"``):
averaged over the ``K`` residues it equals the exact gradient, so the paper's learning rates and
step decay (tuned per epoch) keep their meaning at every ``K``. ``grad_scale="sum"`` is the
literal Eq. 7. Both coincide at ``K = 1``.

Batch normalisation. The backbone's BatchNorm layers stay in eval mode (running statistics frozen,
affine parameters trained). A frame's feature is then a function of that frame alone, so chunking
the forward pass, mixing gradient and no-gradient chunks, and recomputing a chunk under
checkpointing all give exactly the unfolded model's features; statistics of chunks of one video's
strongly correlated frames would be poor estimates anyway.

Batching. The frames that need the backbone are gathered into chunks of ``chunk_size`` frames
across the videos of a batch (:func:`batch_surrogate_features`), so that the ``T / K`` gradient
frames of each video still fill the device when K is large.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from aggregator.streams import STREAMS

GradScale = Literal["unbiased", "sum"]

# A function that turns a chunk of stored inputs (e.g. uint8 [n, C, H, W] on the CPU) into the
# backbone's input on the right device (float, normalised).
Prepare = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class FrameInputs(Protocol):
    """A video's backbone inputs, loaded a chunk at a time (e.g. uint8 crops -> normalised)."""

    @property
    def n_frames(self) -> int: ...

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """Backbone inputs ``[len(index), *input]`` of frames ``index``, on the compute device."""
        ...


Frames = torch.Tensor | FrameInputs


def n_frames_of(frames: Frames) -> int:
    """``T`` of a tensor ``[T, ...]`` or of a :class:`FrameInputs`."""
    if isinstance(frames, torch.Tensor):
        return int(frames.shape[0])
    return int(frames.n_frames)


def periodic_subset(n_frames: int, period: int, epoch: int) -> torch.Tensor:
    """Indices ``t`` in ``[0, n_frames)`` with ``t ≡ epoch (mod period)`` (int64, ascending)."""
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames!r}")
    if period < 1:
        raise ValueError(f"period K must be >= 1, got {period!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch!r}")
    start = epoch % period
    if start >= n_frames:
        return torch.empty(0, dtype=torch.long)
    return torch.arange(start, n_frames, period, dtype=torch.long)


def grad_multiplier(period: int, grad_scale: GradScale) -> float:
    """Factor applied to the gradient of a subset frame's feature (see the module docstring)."""
    if grad_scale == "unbiased":
        return float(period)
    if grad_scale == "sum":
        return 1.0
    raise ValueError(f"grad_scale must be 'unbiased' or 'sum', got {grad_scale!r}")


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass, gradient multiplied by ``factor`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, with the gradient flowing back through it multiplied by ``factor``."""
    if factor == 1.0:
        return x
    out: torch.Tensor = _ScaleGrad.apply(x, factor)
    return out


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (autocast) to float32; float32/float64 kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def frame_loader(frames: Frames, prepare: Prepare | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``idx -> [len(idx), *input]``: a video's stored frames as its backbone's input."""
    if not isinstance(frames, torch.Tensor):
        return frames.take
    tensor = frames
    prep: Prepare = prepare if prepare is not None else (lambda x: x)
    return lambda idx: prep(tensor[idx])


def _plan(indices: Sequence[torch.Tensor], size: int) -> list[list[tuple[int, torch.Tensor]]]:
    """Chunks of at most ``size`` frames that cross video boundaries: ``[(video, frames), ...]``."""
    chunks: list[list[tuple[int, torch.Tensor]]] = []
    room = 0
    for v, idx in enumerate(indices):
        start = 0
        while start < idx.numel():
            if room == 0:
                chunks.append([])
                room = size
            piece = idx[start : start + room]
            chunks[-1].append((v, piece))
            start += piece.numel()
            room -= piece.numel()
    return chunks


def _run(
    loaders: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    indices: Sequence[torch.Tensor],
    chunk_size: int,
    forward: Callable[[torch.Tensor], torch.Tensor],
) -> list[list[torch.Tensor]]:
    """Per video, the features of its ``indices`` (in order), as pieces of cross-video chunks."""
    out: list[list[torch.Tensor]] = [[] for _ in indices]
    for chunk in _plan(indices, chunk_size):
        x = torch.cat([loaders[v](idx) for v, idx in chunk])
        feats = forward(x)
        for (v, _), f in zip(chunk, feats.split([int(i.numel()) for _, i in chunk]), strict=True):
            out[v].append(f)
    return out


def batch_surrogate_features(
    backbone: nn.Module,
    frames: Sequence[Frames],
    grad_index: Sequence[torch.Tensor],
    *,
    prepare: Prepare | None = None,
    known: Sequence[torch.Tensor | None] | None = None,
    chunk_size: int = 32,
    grad_factor: float = 1.0,
    checkpoint: bool = False,
) -> list[torch.Tensor]:
    """:func:`surrogate_features` of several videos; backbone calls batch frames across videos.

    Small subsets (``T / K`` frames per video) are gathered into chunks of ``chunk_size`` frames
    whatever video they come from, so that a large K does not turn into many tiny backbone calls.
    Returns one ``[T_i, d]`` tensor per video.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if len(grad_index) != len(frames):
        raise ValueError(f"{len(frames)} videos but {len(grad_index)} grad_index tensors")
    known_list: list[torch.Tensor | None] = (
        list(known) if known is not None else [None] * len(frames)
    )
    lengths = [n_frames_of(f) for f in frames]
    grads: list[torch.Tensor] = []
    rests: list[torch.Tensor] = []
    for v, (t, gi, kn) in enumerate(zip(lengths, grad_index, known_list, strict=True)):
        if t < 1:
            raise ValueError(f"video {v}: a video needs at least one frame, got 0")
        gi = gi.to(torch.long).cpu()
        if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= t):
            raise ValueError(f"video {v}: grad_index out of range for T={t}: {gi.tolist()!r}")
        if kn is not None and (kn.dim() != 2 or int(kn.shape[0]) != t):
            raise ValueError(
                f"video {v}: known features must be [T={t}, d], got {tuple(kn.shape)!r}"
            )
        with_grad = torch.zeros(t, dtype=torch.bool)
        with_grad[gi] = True
        grads.append(gi)
        # frames without gradient that need the backbone: none when their features are known
        rests.append(torch.nonzero(~with_grad).flatten() if kn is None else gi[:0])
    loaders = [frame_loader(f, prepare) for f in frames]

    def with_graph(x: torch.Tensor) -> torch.Tensor:
        f = _checkpoint(backbone, x, use_reentrant=False) if checkpoint else backbone(x)
        return scale_grad(_full(f), grad_factor)

    def without_graph(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _full(backbone(x))

    fresh = _run(loaders, grads, chunk_size, with_graph)
    const = _run(loaders, rests, chunk_size, without_graph)

    out: list[torch.Tensor] = []
    for t, gi, kn, fr, co in zip(lengths, grads, known_list, fresh, const, strict=True):
        if not fr:  # no frame carries gradient
            out.append(_full(kn.detach()) if kn is not None else torch.cat(co))
            continue
        grad_feats = torch.cat(fr)  # [n, d]
        if gi.numel() == t:
            out.append(grad_feats)  # every frame carries gradient, already in order
            continue
        rest = torch.nonzero(torch.isin(torch.arange(t), gi, invert=True)).flatten()
        feats = grad_feats.new_empty(t, *grad_feats.shape[1:])  # [T, d] or maps [T, h, w, C]
        with torch.no_grad():
            feats[rest] = kn[rest].to(feats) if kn is not None else torch.cat(co).to(feats)
        # out of place, so that the result is differentiable w.r.t. the fresh rows
        out.append(feats.index_copy(0, gi.to(feats.device), grad_feats))
    return out


def surrogate_features(
    backbone: nn.Module,
    frames: Frames,
    grad_index: torch.Tensor,
    *,
    prepare: Prepare | None = None,
    known: torch.Tensor | None = None,
    chunk_size: int = 32,
    grad_factor: float = 1.0,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Features of all ``T`` frames of one video, with autograd only through ``grad_index``.

    Args:
        backbone: ``[n, *input] -> [n, d]``, applied frame-wise (BatchNorm in eval mode).
        frames: the video's inputs: a tensor ``[T, *stored]`` (``prepare`` maps a chunk of it to
            backbone inputs on the compute device; default: as they are) or a
            :class:`FrameInputs` that loads chunks itself.
        grad_index: ``[n]`` int64 frame indices whose features carry gradient (e.g.
            :func:`periodic_subset`); may be empty.
        known: optional ``[T, d]`` features to use, without gradient, for the frames outside
            ``grad_index`` instead of running the backbone on them (e.g. read from a store).
        chunk_size: frames per backbone call.
        grad_factor: multiplier of the gradient flowing into the backbone (see
            :func:`grad_multiplier`).
        checkpoint: recompute the gradient chunks in the backward pass instead of keeping their
            activations: memory of one chunk instead of ``len(grad_index)`` frames, for one more
            forward pass of those frames.

    Returns:
        ``[T, d]`` features (float32 for half-precision backbone outputs); rows in
        ``grad_index`` are differentiable w.r.t. the backbone's parameters, the others are
        constants.
    """
    return batch_surrogate_features(
        backbone,
        [frames],
        [grad_index],
        prepare=prepare,
        known=[known],
        chunk_size=chunk_size,
        grad_factor=grad_factor,
        checkpoint=checkpoint,
    )[0]


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in eval mode (running statistics frozen)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@dataclass(frozen=True)
class VideoBatchItem:
    """One video of a training batch: per-stream stored inputs and gradient frames.

    ``frames[stream]`` is ``[T, *stored]``; ``grad_index`` the frames that carry gradient;
    ``known[stream]`` optional ``[T, d]`` features for the other frames.
    """

    frames: Mapping[str, Frames]
    grad_index: torch.Tensor
    known: Mapping[str, torch.Tensor] | None = None

    @property
    def n_frames(self) -> int:
        return n_frames_of(next(iter(self.frames.values())))


class FinetuneModel(nn.Module):
    """Backbone(s) + a video head, trained end to end with the surrogate gradient.

    ``head`` takes ``forward(x {stream: [B, T, d]}, lengths [B]) -> [B, C]`` (e.g. a
    :class:`aggregator.heads.TwoStream` of temporal pyramids, whose learned fusion weights mix the
    streams). ``forward(items, ...)`` takes a list of videos of any lengths and returns ``[B, C]``
    logits; each video's features are computed with :func:`surrogate_features` and padded into
    the head's ``[B, T, d]`` + ``lengths`` contract.

    :meth:`train` keeps the backbones' BatchNorm layers in eval mode (see the module docstring).
    ``head_inputs`` renames streams for the head (e.g. ``{"appearance": "appearance_map"}`` when
    the backbones output spatial maps ``[T, h, w, C]``, see :mod:`aggregator.finetune.maps`).
    """

    def __init__(
        self,
        *,
        backbones: Mapping[str, nn.Module],
        head: nn.Module,
        prepare: Mapping[str, Prepare] | None = None,
        head_inputs: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        streams = [s for s in STREAMS if s in backbones]
        if not streams or set(backbones) - set(STREAMS):
            raise ValueError(f"backbones must be keyed by {STREAMS}, got {sorted(backbones)!r}")
        self.streams: list[str] = streams
        self.backbones = nn.ModuleDict({s: backbones[s] for s in streams})
        self.head = head
        self._prepare: dict[str, Prepare] = dict(prepare or {})
        # the head's name for each stream's features (e.g. appearance -> appearance_map)
        self.head_inputs: dict[str, str] = {st: st for st in streams}
        self.head_inputs.update(head_inputs or {})
        # with keep_features, forward leaves each video's detached [T, d] features per stream here
        self.keep_features = False
        self.last_features: list[dict[str, torch.Tensor]] = []

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        freeze_batchnorm(self.backbones)
        return self

    def stream_features(
        self,
        stream: str,
        items: Sequence[VideoBatchItem],
        *,
        chunk_size: int = 32,
        grad_factor: float = 1.0,
        checkpoint: bool = False,
    ) -> list[torch.Tensor]:
        """:func:`batch_surrogate_features` of ``stream`` for every video of ``items``."""
        return batch_surrogate_features(
            self.backbones[stream],
            [it.frames[stream] for it in items],
            [it.grad_index for it in items],
            prepare=self._prepare.get(stream),
            known=[None if it.known is None else it.known.get(stream) for it in items],
            chunk_size=chunk_size,
            grad_factor=grad_factor,
            checkpoint=checkpoint,
        )

    def forward(
        self,
        items: Sequence[VideoBatchItem],
        chunk_size: int = 32,
        grad_factor: float = 1.0,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        if not items:
            raise ValueError("empty batch")
        self.last_features = [{} for _ in items]
        lengths = torch.tensor([it.n_frames for it in items], dtype=torch.long)
        x: dict[str, torch.Tensor] = {}
        for stream in self.streams:
            feats = self.stream_features(
                stream, items, chunk_size=chunk_size, grad_factor=grad_factor, checkpoint=checkpoint
            )
            if self.keep_features:
                for i, f in enumerate(feats):
                    self.last_features[i][stream] = f.detach()
            # [B, T_max, d] (or [B, T_max, h, w, C] maps)
            x[self.head_inputs[stream]] = nn.utils.rnn.pad_sequence(feats, batch_first=True)
        device = next(iter(x.values())).device
        out: torch.Tensor = self.head(x, lengths.to(device))
        return _full(out)


def step_in_chunks(
    model: FinetuneModel,
    items: Sequence[VideoBatchItem],
    labels: torch.Tensor,
    *,
    grad_frames: int,
    chunk_size: int = 32,
    grad_factor: float = 1.0,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[torch.Tensor, int]:
    """One step's loss and gradients with the backbones' backward pass in chunks of frames.

    Accumulates every parameter's ``.grad`` exactly as ``loss_and_correct(model(items), labels)``
    followed by ``loss.backward()`` would, but no graph ever spans more than ``grad_frames``
    frames, so that activation memory is that of ``grad_frames`` frames whatever T and K are:

    1. every frame's features without a graph (the subset's with the current weights, the
       others computed or known, as in :meth:`FinetuneModel.forward`);
    2. the head on those features, held as leaves: the loss, the head's gradients and each
       frame's dL/dfeature;
    3. per chunk of ``grad_frames`` subset frames (across the batch's videos): the backbone
       again, with a graph, and its backward pass from that chunk's dL/dfeature (times
       ``grad_factor``). This is activation checkpointing at the backbone's output.

    Exact because a frame's feature depends on that frame alone (BatchNorm frozen). Costs one
    more forward pass of the subset frames. Returns the detached loss and the top-1 hits.
    """
    if grad_frames < 1:
        raise ValueError(f"grad_frames must be >= 1, got {grad_frames!r}")
    if not items:
        raise ValueError("empty batch")
    streams = model.streams
    feats: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), autocast():
        for stream in streams:
            feats[stream] = model.stream_features(stream, items, chunk_size=chunk_size)
    leaves = {s: [f.detach().requires_grad_(True) for f in feats[s]] for s in streams}
    lengths = torch.tensor([it.n_frames for it in items], dtype=torch.long)
    with autocast():
        x = {
            model.head_inputs[s]: nn.utils.rnn.pad_sequence(leaves[s], batch_first=True)
            for s in streams
        }
        logits = _full(model.head(x, lengths.to(labels.device)))
    loss, correct = loss_and_correct(logits, labels)
    loss.backward()
    for stream in streams:
        loaders = [frame_loader(it.frames[stream], model._prepare.get(stream)) for it in items]
        subsets = [it.grad_index.to(torch.long).cpu() for it in items]
        for chunk in _plan(subsets, grad_frames):
            upstream = []
            for v, idx in chunk:
                g = leaves[stream][v].grad
                rows = idx.to(leaves[stream][v].device)
                upstream.append(torch.zeros_like(leaves[stream][v][rows]) if g is None else g[rows])
            with autocast():
                f = _full(model.backbones[stream](torch.cat([loaders[v](i) for v, i in chunk])))
            torch.autograd.backward(f, (torch.cat(upstream) * grad_factor).to(f.dtype))
    if model.keep_features:
        model.last_features = [
            {s: feats[s][i].detach() for s in streams} for i in range(len(items))
        ]
    return loss.detach(), correct


def loss_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy and the number of top-1 hits of a batch."""
    loss = F.cross_entropy(_full(logits), labels)
    correct = int((logits.detach().argmax(1) == labels).sum())
    return loss, correct
