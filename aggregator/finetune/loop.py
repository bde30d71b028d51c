"""The fine-tuning loop: SGD over videos, one periodic frame subset per epoch, DDP, checkpoints.

One process per device (``torchrun`` sets the environment; :func:`init_distributed` joins the
group: gloo on CPU, nccl on GPU). Videos are sharded across ranks by a ``DistributedSampler``
(reshuffled every epoch from ``seed`` and the epoch number); rank 0 writes every output.

Outputs in ``out_dir``:

- ``checkpoint.pt`` after every epoch (model, optimiser, scheduler, next epoch, per-epoch history,
  RNG states, settings), written atomically. A run started on a directory holding a checkpoint
  resumes from it (``resume=True``, the default) when its settings agree (see
  :meth:`FinetuneSettings.resumable`; ``epochs`` may be raised to train longer). The random
  streams are re-seeded from ``(seed, epoch, rank)`` at every epoch, so a resumed run retraces an
  uninterrupted one.
- ``metrics.json``: ``{"epochs": [{epoch, residue, frames_with_grad, frames_total, loss,
  accuracy, seconds, cpu_seconds, lr}, ...], ...}``, rewritten after every epoch.
- at the end: ``backbone_<stream>.pt`` (the backbone's state dict), ``head.pt`` (the head's
  state dict) and ``config.json`` (what rebuilds them, plus the learned fusion weights).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import pickle
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from aggregator.finetune.maps import exported_backbone
from aggregator.finetune.surrogate import (
    STREAMS,
    FinetuneModel,
    Frames,
    GradScale,
    VideoBatchItem,
    grad_multiplier,
    loss_and_correct,
    n_frames_of,
    periodic_subset,
    step_in_chunks,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
# Seed 002, section 4: SGD, lr 0.001 (appearance) / 0.005 (motion), divided by 10 every 25
# epochs (appearance) or after epochs 80 and 110 (motion), the UCF-101 schedule.
DEFAULT_LR = {"appearance": 1e-3, "motion": 5e-3}
DEFAULT_MILESTONES = {"appearance": (25, 50, 75, 100, 125), "motion": (80, 110)}


@dataclass(frozen=True)
class FinetuneSettings:
    """Optimisation settings. ``lr`` and ``milestones`` are per stream (parameters of a stream's
    backbone and head); parameters shared by the streams (fusion weights) follow the first stream.
    Seed 002 gives no weight-decay value ("L2 weight decay"); 5e-4 is the two-stream convention.
    """

    period: int = 1
    epochs: int = 1
    batch_videos: int = 4
    lr: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    milestones: Mapping[str, tuple[int, ...]] = field(
        default_factory=lambda: dict(DEFAULT_MILESTONES)
    )
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_scale: GradScale = "unbiased"
    chunk_size: int = 32
    checkpoint: bool = False
    grad_frames: int | None = None
    seed: int = 0
    amp: bool = False

    def __post_init__(self) -> None:
        if self.period < 1:
            raise ValueError(f"period K must be >= 1, got {self.period!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs!r}")
        if self.batch_videos < 1:
            raise ValueError(f"batch_videos must be >= 1, got {self.batch_videos!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size!r}")
        if self.grad_frames is not None and self.grad_frames < 1:
            raise ValueError(f"grad_frames must be >= 1 (or None), got {self.grad_frames!r}")
        grad_multiplier(self.period, self.grad_scale)  # validates grad_scale

    def resumable(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint: all but ``epochs`` (a run
        may be extended) and those that do not change the optimisation beyond rounding
        (``chunk_size``, ``checkpoint``, ``grad_frames``, ``amp``: a run may resume on other
        hardware)."""
        d = dict(_jsonable(asdict(self)))
        for key in ("epochs", "chunk_size", "checkpoint", "grad_frames", "amp"):
            d.pop(key)
        return d


@dataclass(frozen=True)
class TrainVideo:
    video_id: str
    label: int


class VideoSource(Protocol):
    """Where a training video's inputs (and optional precomputed features) come from.

    A source may also have ``remember(video_id, features: {stream: [T, d]})``: the loop then
    hands it every video's features after its step (see
    :class:`aggregator.finetune.inputs.FeatureMemory`).
    """

    def frames(self, video_id: str) -> dict[str, Frames]:
        """Per stream the video's backbone inputs (loaded chunk by chunk on the device)."""
        ...

    def known(self, video_id: str) -> dict[str, torch.Tensor] | None:
        """Per stream ``[T, d]`` features for the frames outside the subset, or None."""
        ...


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- distributed
def distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> torch.device:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), pick this rank's device.

    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; with several processes on a GPU node
    each takes ``cuda:LOCAL_RANK``. Backend: nccl on GPU, gloo on CPU. Without torchrun's variables
    it is a plain single-process run.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


# --------------------------------------------------------------------------- optimisation
def _stream_of(name: str, streams: Sequence[str]) -> str | None:
    for s in streams:
        if f".{s}." in f".{name}":
            return s
    return None


def make_optimizer(
    model: FinetuneModel, settings: FinetuneSettings
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with one parameter group per stream and a per-stream step decay of the learning rate.

    A parameter belongs to a stream when its name has a ``.<stream>.`` component (the backbone
    ``backbones.<stream>.*`` and a per-stream head ``head.heads.<stream>.*``); the rest (fusion
    weights) joins the first stream's group.
    """
    streams = model.streams
    for s in streams:
        if s not in settings.lr:
            raise ValueError(f"no learning rate for stream {s!r} in {dict(settings.lr)!r}")
    groups: dict[str, list[nn.Parameter]] = {s: [] for s in streams}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[_stream_of(name, streams) or streams[0]].append(p)
    param_groups = [
        {"params": groups[s], "lr": float(settings.lr[s]), "stream": s} for s in streams
    ]
    opt = torch.optim.SGD(
        param_groups,
        lr=float(settings.lr[streams[0]]),
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )

    def decay(stream: str) -> Callable[[int], float]:
        steps = sorted(settings.milestones.get(stream, ()))
        return lambda epoch: settings.gamma ** bisect.bisect_right(steps, epoch)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, [decay(s) for s in streams])
    return opt, sched


def _batches(order: list[int], size: int) -> list[list[int]]:
    """Consecutive batches of ``size``; a trailing batch of one joins the previous one (a
    batch-normalised head cannot train on one video)."""
    out = [order[i : i + size] for i in range(0, len(order), size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2].extend(out.pop())
    return out


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Re-seed the random streams the loop uses (dropout, ...) from ``(seed, epoch, rank)``."""
    s = (seed * 1_000_003 + epoch * 9_176 + rank) % (2**31)
    random.seed(s)
    torch.manual_seed(s)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded onto a GPU moved it there
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, *, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`finetune` without running code from the file.

    Everything in it (tensors, the optimiser's and scheduler's state dicts, the Python RNG state as
    a tuple of ints, the history as plain numbers and strings) is what ``torch.load``'s
    ``weights_only`` unpickler accepts, so it is loaded with it: a crafted file that would call a
    function when unpickled is refused instead.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{str(path)!r} is not a framepool fine-tuning checkpoint that loads safely "
            f"(it holds objects other than tensors and plain values: {first}); "
            "delete it or use a new output directory"
        ) from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{str(path)!r} is not a fine-tuning checkpoint (missing {missing})")
    return ckpt


_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "rng", "settings")


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2))
    os.replace(tmp, path)


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _resume_key(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a job's ``config`` a resumed run must share: what the model and data are, not
    where the starting weights or the stored features came from (the checkpoint replaces them)."""
    skip = ("run_id", "store", "store_streams", "start_extractor", "reuse_features")
    return {k: v for k, v in _jsonable(dict(config or {})).items() if k not in skip}


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _average_gradients(model: nn.Module, world: int) -> None:
    """All-reduce every trainable parameter's gradient to the mean over ``world`` processes (a
    parameter without a gradient on some rank counts as zero there)."""
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def _unwrap(model: nn.Module) -> FinetuneModel:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    assert isinstance(inner, FinetuneModel)
    return inner


# --------------------------------------------------------------------------- the loop
def finetune(
    model: FinetuneModel,
    videos: Sequence[TrainVideo],
    source: VideoSource,
    settings: FinetuneSettings,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    config: Mapping[str, Any] | None = None,
    resume: bool = True,
    on_batch: Callable[[int, list[str], list[VideoBatchItem]], None] | None = None,
    stop_after: int | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` end to end on ``videos``; returns the per-epoch history.

    ``config`` (JSON-able: head name and arguments, class names, extractor settings, ...) is
    written into ``config.json`` next to the weights. ``on_batch(epoch, video_ids, items)`` is
    called before every step (instrumentation). ``stop_after`` ends the run after that many epochs
    of this call, as a crash would (used to test resumption).
    """
    if not videos:
        raise ValueError("no training videos")
    out = Path(out_dir)
    rank, world = distributed()
    dev = torch.device(device)
    model.to(dev)
    opt, sched = make_optimizer(model, settings)

    history: list[dict[str, Any]] = []
    start = 0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=dev)
        diff = _differences(ckpt["settings"], settings.resumable())
        diff += _differences(ckpt.get("config", {}), _resume_key(config))
        if diff:
            raise ValueError(
                f"{str(ckpt_path)!r} was written by a run with other settings (differ: {diff}); "
                "use a new output directory or start over without resuming"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start = int(ckpt["epoch"])
        history = list(ckpt["history"])
        log.info("resuming from %s at epoch %d", ckpt_path, start + 1)

    if world > 1:  # every rank must have read the same checkpoint (out_dir on a shared filesystem)
        agreed = torch.tensor([start, -start], dtype=torch.float64, device=dev)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        if int(agreed[0]) != -int(agreed[1]):
            raise RuntimeError(
                f"ranks disagree on the epoch to resume from ({int(-agreed[1])}..{int(agreed[0])});"
                f" {str(out)!r} must be on a filesystem every rank sees"
            )

    net: nn.Module = model
    # in chunks, one step runs several backward passes: gradients are averaged by hand instead
    if settings.grad_frames is None and dist.is_available() and dist.is_initialized():
        # Frames outside P_r never reach the backbone's graph; when a video is shorter than K, a
        # batch can have no frame in P_r at all and the backbone's parameters go unused in that
        # step, which DDP must be told about (it costs a graph traversal per step, so only then).
        shortest = min(n_frames_of(next(iter(source.frames(v.video_id).values()))) for v in videos)
        net = DistributedDataParallel(
            model,
            device_ids=None,  # inputs stay where the sources put them; the module is on `dev`
            find_unused_parameters=shortest < settings.period,
        )
    indices: Any = list(range(len(videos)))  # a map-style dataset of video indices
    sampler: DistributedSampler[int] = DistributedSampler(
        indices, num_replicas=world, rank=rank, shuffle=True, seed=settings.seed
    )
    if _has_batchnorm(model.head) and len(sampler) < 2:
        raise ValueError(
            f"{len(videos)} video(s) over {world} process(es) leaves {len(sampler)} per process; "
            "a head with batch normalisation needs at least 2"
        )
    remember = getattr(source, "remember", None)
    model.keep_features = callable(remember)
    factor = grad_multiplier(settings.period, settings.grad_scale)

    def autocast() -> AbstractContextManager[Any]:
        return torch.autocast(dev.type, dtype=torch.bfloat16) if settings.amp else nullcontext()

    amp = autocast()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    last = settings.epochs if stop_after is None else min(settings.epochs, start + stop_after)
    for epoch in range(start, last):
        _seed_everything(settings.seed, epoch, rank)
        sampler.set_epoch(epoch)
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), dtype=torch.float64)
        counts = torch.zeros(4, dtype=torch.float64)  # correct, videos, frames_grad, frames
        for batch in _batches(list(sampler), settings.batch_videos):
            ids = [videos[i].video_id for i in batch]
            items = []
            for vid in ids:
                frames = source.frames(vid)
                t = n_frames_of(next(iter(frames.values())))
                items.append(
                    VideoBatchItem(
                        frames=frames,
                        grad_index=periodic_subset(t, settings.period, epoch),
                        known=source.known(vid),
                    )
                )
            if on_batch is not None:
                on_batch(epoch, ids, items)
            labels = torch.tensor([videos[i].label for i in batch], device=dev)
            opt.zero_grad(set_to_none=True)
            if settings.grad_frames is None:
                with amp:
                    logits = net(
                        items,
                        chunk_size=settings.chunk_size,
                        grad_factor=factor,
                        checkpoint=settings.checkpoint,
                    )
                loss, correct = loss_and_correct(logits, labels)
                loss.backward()
            else:
                loss, correct = step_in_chunks(
                    model,
                    items,
                    labels,
                    grad_frames=settings.grad_frames,
                    chunk_size=settings.chunk_size,
                    grad_factor=factor,
                    autocast=autocast,
                )
                if world > 1:
                    _average_gradients(model, world)
            opt.step()
            if callable(remember):
                for vid, feats in zip(ids, model.last_features, strict=True):
                    remember(vid, feats)
                model.last_features = []
            loss_sum += float(loss.detach()) * len(batch)
            counts += torch.tensor(
                [
                    correct,
                    len(batch),
                    sum(int(it.grad_index.numel()) for it in items),
                    sum(it.n_frames for it in items),
                ],
                dtype=torch.float64,
            )
        lr = [float(g["lr"]) for g in opt.param_groups]
        sched.step()
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        if dist.is_available() and dist.is_initialized():
            stats = torch.cat([loss_sum[None], counts]).to(dev)
            dist.all_reduce(stats)
            secs = torch.tensor([seconds], dtype=torch.float64, device=dev)
            dist.all_reduce(secs, op=dist.ReduceOp.MAX)
            loss_sum, counts, seconds = stats[0].cpu(), stats[1:].cpu(), float(secs)
        n = max(float(counts[1]), 1.0)
        record = {
            "epoch": epoch + 1,
            "residue": epoch % settings.period,
            "frames_with_grad": int(counts[2]),
            "frames_total": int(counts[3]),
            "loss": float(loss_sum) / n,
            "accuracy": float(counts[0]) / n,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # this process's CPU time (rank 0)
            "lr": {g["stream"]: v for g, v in zip(opt.param_groups, lr, strict=True)},
        }
        history.append(record)
        (log.info if rank == 0 else log.debug)(
            "epoch %d/%d: loss %.4f, accuracy %.3f, %d/%d frames with gradient, %.1f s",
            epoch + 1,
            settings.epochs,
            record["loss"],
            record["accuracy"],
            record["frames_with_grad"],
            record["frames_total"],
            seconds,
        )
        if rank == 0:
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "rng": _rng_state(),
                    "settings": settings.resumable(),
                    "config": _resume_key(config),
                },
                ckpt_path,
            )
            _atomic_json({"epochs": history}, out / METRICS)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    finished = bool(history) and history[-1]["epoch"] >= settings.epochs
    if rank == 0 and finished:
        write_outputs(model, out, settings=settings, config=config or {}, history=history)
    return history


def write_outputs(
    model: FinetuneModel,
    out: Path,
    *,
    settings: FinetuneSettings,
    config: Mapping[str, Any],
    history: list[dict[str, Any]],
) -> None:
    """``backbone_<stream>.pt``, ``head.pt``, ``config.json`` and the final ``metrics.json``."""
    for stream in model.streams:
        net = exported_backbone(model.backbones[stream])
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        _atomic_save(state, out / f"backbone_{stream}.pt")
    _atomic_save({k: v.detach().cpu() for k, v in model.head.state_dict().items()}, out / "head.pt")
    fusion: dict[str, float] | None = None
    fusion_fn = getattr(model.head, "fusion_weights", None)
    if callable(fusion_fn):
        fusion = dict(fusion_fn())
    full = {**dict(config), "streams": list(model.streams), "settings": asdict(settings)}
    if fusion is not None:
        full["fusion_weights"] = fusion
    _atomic_json(full, out / "config.json")
    last = history[-1]
    _atomic_json(
        {
            "epochs": history,
            "loss": last["loss"],
            "accuracy": last["accuracy"],
            "seconds": float(sum(h["seconds"] for h in history)),
            "fusion_weights": fusion,
        },
        out / METRICS,
    )


__all__ = [
    "CHECKPOINT",
    "DEFAULT_LR",
    "DEFAULT_MILESTONES",
    "METRICS",
    "STREAMS",
    "FinetuneSettings",
    "TrainVideo",
    "VideoSource",
    "distributed",
    "finetune",
    "init_distributed",
    "load_checkpoint",
    "make_optimizer",
    "write_outputs",
]
