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
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from aggregator.finetune.checkpoint import (
    CHECKPOINT,
    differences,
    load_checkpoint,
    resume_key,
    rng_state,
    set_rng_state,
)
from aggregator.finetune.maps import exported_backbone
from aggregator.finetune.sources import TrainVideo, VideoSource
from aggregator.finetune.surrogate import (
    STREAMS,
    FinetuneModel,
    GradScale,
    VideoBatchItem,
    grad_multiplier,
    loss_and_correct,
    n_frames_of,
    periodic_subset,
    step_in_chunks,
)
from aggregator.rundir import CONFIG_FILE, METRICS_FILE, finite, save_torch, write_json
from extractor.runtime import resolve_device

log = logging.getLogger(__name__)

METRICS = METRICS_FILE
HEAD_FILE = "head.pt"  # the head's weights; the job copies them to the run directory's model.pt
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
        d = dict(finite(asdict(self)))
        for key in ("epochs", "chunk_size", "checkpoint", "grad_frames", "amp"):
            d.pop(key)
        return d


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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)  # cuda under torchrun: cuda:LOCAL_RANK
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", 0)
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


def make_stream_sgd(
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
    loop = FinetuneLoop(
        model, videos, source, settings, Path(out_dir), torch.device(device), config, on_batch
    )
    if resume:
        loop.resume()
    loop.agree_on_start()
    loop.setup()
    last = settings.epochs if stop_after is None else min(settings.epochs, loop.start + stop_after)
    for epoch in range(loop.start, last):
        loop.train_epoch(epoch)
        loop.save_checkpoint(epoch)
    finished = bool(loop.history) and loop.history[-1]["epoch"] >= settings.epochs
    if loop.rank == 0 and finished:
        write_outputs(model, loop.out, settings=settings, config=config or {}, history=loop.history)
    return loop.history


class FinetuneLoop:
    """The state of one :func:`finetune` call (model, optimiser, sampler, history) and its steps:
    :meth:`resume`, :meth:`agree_on_start`, :meth:`setup`, then per epoch :meth:`train_epoch`
    and :meth:`save_checkpoint`."""

    def __init__(
        self,
        model: FinetuneModel,
        videos: Sequence[TrainVideo],
        source: VideoSource,
        settings: FinetuneSettings,
        out: Path,
        device: torch.device,
        config: Mapping[str, Any] | None,
        on_batch: Callable[[int, list[str], list[VideoBatchItem]], None] | None,
    ) -> None:
        self.model, self.videos, self.source = model, videos, source
        self.settings, self.out, self.dev = settings, out, device
        self.config, self.on_batch = config, on_batch
        self.rank, self.world = distributed()
        model.to(device)
        self.opt, self.sched = make_stream_sgd(model, settings)
        self.history: list[dict[str, Any]] = []
        self.start = 0  # the first epoch this call trains
        self.ckpt_path = out / CHECKPOINT
        self.factor = grad_multiplier(settings.period, settings.grad_scale)
        self.net: nn.Module = model  # what the forward pass goes through (DDP or the model)
        self.sampler: DistributedSampler[int] | None = None
        self.remember: Callable[[str, dict[str, torch.Tensor]], None] | None = None

    def resume(self) -> None:
        """Load the checkpoint in the output directory, if any, when its settings agree."""
        if not self.ckpt_path.exists():
            return
        ckpt = load_checkpoint(self.ckpt_path, map_location=self.dev)
        diff = differences(ckpt["settings"], self.settings.resumable())
        diff += differences(ckpt.get("config", {}), resume_key(self.config))
        if diff:
            raise ValueError(
                f"{str(self.ckpt_path)!r} was written by a run with other settings "
                f"(differ: {diff}); use a new output directory or start over without resuming"
            )
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.start = int(ckpt["epoch"])
        self.history = list(ckpt["history"])
        log.info("resuming from %s at epoch %d", self.ckpt_path, self.start + 1)

    def agree_on_start(self) -> None:
        """Every rank must have read the same checkpoint (out_dir on a shared filesystem)."""
        if self.world <= 1:
            return
        agreed = torch.tensor([self.start, -self.start], dtype=torch.float64, device=self.dev)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        if int(agreed[0]) != -int(agreed[1]):
            raise RuntimeError(
                f"ranks disagree on the epoch to resume from ({int(-agreed[1])}..{int(agreed[0])});"
                f" {str(self.out)!r} must be on a filesystem every rank sees"
            )

    def setup(self) -> None:
        """DDP around the model, the video sampler, the feature memory, the output directory."""
        settings, model = self.settings, self.model
        # in chunks, one step runs several backward passes: gradients are averaged by hand instead
        if settings.grad_frames is None and dist.is_available() and dist.is_initialized():
            # Frames outside P_r never reach the backbone's graph; when a video is shorter than
            # K, a batch can have no frame in P_r at all and the backbone's parameters go unused
            # in that step, which DDP must be told about (it costs a graph traversal per step, so
            # only then).
            shortest = min(
                n_frames_of(next(iter(self.source.frames(v.video_id).values())))
                for v in self.videos
            )
            self.net = DistributedDataParallel(
                model,
                device_ids=None,  # inputs stay where the sources put them; the module is on `dev`
                find_unused_parameters=shortest < settings.period,
            )
        indices: Any = list(range(len(self.videos)))  # a map-style dataset of video indices
        self.sampler = DistributedSampler(
            indices, num_replicas=self.world, rank=self.rank, shuffle=True, seed=settings.seed
        )
        if _has_batchnorm(model.head) and len(self.sampler) < 2:
            raise ValueError(
                f"{len(self.videos)} video(s) over {self.world} process(es) leaves "
                f"{len(self.sampler)} per process; a head with batch normalisation needs at least 2"
            )
        remember = getattr(self.source, "remember", None)
        self.remember = remember if callable(remember) else None
        model.keep_features = self.remember is not None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.settings.amp:
            return torch.autocast(self.dev.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this rank's videos; appends the epoch's record to the history."""
        assert self.sampler is not None, "setup() first"
        _seed_everything(self.settings.seed, epoch, self.rank)
        self.sampler.set_epoch(epoch)
        self.model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), dtype=torch.float64)
        counts = torch.zeros(4, dtype=torch.float64)  # correct, videos, frames_grad, frames
        for batch in _batches(list(self.sampler), self.settings.batch_videos):
            ids = [self.videos[i].video_id for i in batch]
            items = self._items(ids, epoch)
            if self.on_batch is not None:
                self.on_batch(epoch, ids, items)
            labels = torch.tensor([self.videos[i].label for i in batch], device=self.dev)
            loss, correct = self._step(items, labels)
            self._remember(ids)
            loss_sum += float(loss.detach()) * len(batch)
            grad_frames = sum(int(it.grad_index.numel()) for it in items)
            frames = sum(it.n_frames for it in items)
            counts += torch.tensor([correct, len(batch), grad_frames, frames], dtype=torch.float64)
        lr = [float(g["lr"]) for g in self.opt.param_groups]
        self.sched.step()
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        loss_sum, counts, seconds = self._sum_over_ranks(loss_sum, counts, seconds)
        n = max(float(counts[1]), 1.0)
        record = {
            "epoch": epoch + 1,
            "residue": epoch % self.settings.period,
            "frames_with_grad": int(counts[2]),
            "frames_total": int(counts[3]),
            "loss": float(loss_sum) / n,
            "accuracy": float(counts[0]) / n,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # this process's CPU time (rank 0)
            "lr": {g["stream"]: v for g, v in zip(self.opt.param_groups, lr, strict=True)},
        }
        self.history.append(record)
        self._log(record)
        return record

    def _items(self, ids: list[str], epoch: int) -> list[VideoBatchItem]:
        """The batch's videos with the epoch's periodic subset as their gradient frames."""
        items = []
        for vid in ids:
            frames = self.source.frames(vid)
            t = n_frames_of(next(iter(frames.values())))
            grad_index = periodic_subset(t, self.settings.period, epoch)
            items.append(
                VideoBatchItem(frames=frames, grad_index=grad_index, known=self.source.known(vid))
            )
        return items

    def _step(self, items: list[VideoBatchItem], labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One optimiser step: in one graph, or with the backward pass in chunks of frames."""
        settings = self.settings
        self.opt.zero_grad(set_to_none=True)
        if settings.grad_frames is None:
            with self.autocast():
                logits = self.net(
                    items,
                    chunk_size=settings.chunk_size,
                    grad_factor=self.factor,
                    checkpoint=settings.checkpoint,
                )
            loss, correct = loss_and_correct(logits, labels)
            loss.backward()
        else:
            loss, correct = step_in_chunks(
                self.model,
                items,
                labels,
                grad_frames=settings.grad_frames,
                chunk_size=settings.chunk_size,
                grad_factor=self.factor,
                autocast=self.autocast,
            )
            if self.world > 1:
                _average_gradients(self.model, self.world)
        self.opt.step()
        return loss, correct

    def _remember(self, ids: list[str]) -> None:
        """Hand the source every video's features of the step (feature memory)."""
        if self.remember is None:
            return
        for vid, feats in zip(ids, self.model.last_features, strict=True):
            self.remember(vid, feats)
        self.model.last_features = []

    def _sum_over_ranks(
        self, loss_sum: torch.Tensor, counts: torch.Tensor, seconds: float
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The epoch's sums over every rank, and the slowest rank's seconds."""
        if not (dist.is_available() and dist.is_initialized()):
            return loss_sum, counts, seconds
        stats = torch.cat([loss_sum[None], counts]).to(self.dev)
        dist.all_reduce(stats)
        secs = torch.tensor([seconds], dtype=torch.float64, device=self.dev)
        dist.all_reduce(secs, op=dist.ReduceOp.MAX)
        return stats[0].cpu(), stats[1:].cpu(), float(secs)

    def _log(self, record: Mapping[str, Any]) -> None:
        (log.info if self.rank == 0 else log.debug)(
            "epoch %d/%d: loss %.4f, accuracy %.3f, %d/%d frames with gradient, %.1f s",
            record["epoch"],
            self.settings.epochs,
            record["loss"],
            record["accuracy"],
            record["frames_with_grad"],
            record["frames_total"],
            record["seconds"],
        )

    def save_checkpoint(self, epoch: int) -> None:
        """Rank 0 writes ``checkpoint.pt`` and ``metrics.json`` after ``epoch``; all ranks wait."""
        if self.rank == 0:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "epoch": epoch + 1,
                "history": self.history,
                "rng": rng_state(),
                "settings": self.settings.resumable(),
                "config": resume_key(self.config),
            }
            save_torch(state, self.ckpt_path)
            write_json(self.out / METRICS, {"epochs": self.history})
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


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
        save_torch(state, out / f"backbone_{stream}.pt")
    save_torch({k: v.detach().cpu() for k, v in model.head.state_dict().items()}, out / HEAD_FILE)
    fusion: dict[str, float] | None = None
    fusion_fn = getattr(model.head, "fusion_weights", None)
    if callable(fusion_fn):
        fusion = dict(fusion_fn())
    full = {**dict(config), "streams": list(model.streams), "settings": asdict(settings)}
    if fusion is not None:
        full["fusion_weights"] = fusion
    write_json(out / CONFIG_FILE, full)
    last = history[-1]
    metrics = {
        "epochs": history,
        "loss": last["loss"],
        "accuracy": last["accuracy"],
        "seconds": float(sum(h["seconds"] for h in history)),
        "fusion_weights": fusion,
    }
    write_json(out / METRICS, metrics)


__all__ = [
    "CHECKPOINT",
    "DEFAULT_LR",
    "DEFAULT_MILESTONES",
    "HEAD_FILE",
    "METRICS",
    "STREAMS",
    "FinetuneLoop",
    "FinetuneSettings",
    "TrainVideo",
    "VideoSource",
    "distributed",
    "finetune",
    "init_distributed",
    "load_checkpoint",
    "make_stream_sgd",
    "write_outputs",
]
