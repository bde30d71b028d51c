"""The fine-tuning loop on tiny in-memory videos: frame coverage, resumption, DDP (gloo)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from aggregator.finetune import FinetuneModel, Frames
from aggregator.finetune.inputs import FeatureMemory
from aggregator.finetune.loop import (
    CHECKPOINT,
    FinetuneSettings,
    TrainVideo,
    finetune,
    load_checkpoint,
)
from aggregator.heads import build_model

LENGTHS = (7, 3, 5, 1, 9)
D = 6


class IdBackbone(nn.Module):
    """``[n, 4, 5, 5] -> [n, D]``; channel 0 only carries the frame's id, the others are the image.

    Every frame whose feature receives a non-zero gradient is recorded in :attr:`grad_ids`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, D)
        self.grad_ids: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0, 0, 0].detach().round().long()
        out = self.fc(torch.relu(self.bn(self.conv(x[:, 1:]))).mean(dim=(2, 3)))
        if out.requires_grad:

            def record(g: torch.Tensor) -> None:
                self.grad_ids.extend(ids[g.abs().sum(1) > 0].tolist())

            out.register_hook(record)
        return out


class TensorSource:
    def __init__(self, frames: dict[str, torch.Tensor]) -> None:
        self._frames = frames

    def frames(self, video_id: str) -> dict[str, Frames]:
        return {"appearance": self._frames[video_id]}

    def known(self, video_id: str) -> dict[str, torch.Tensor] | None:
        return None


def _data(lengths: tuple[int, ...] = LENGTHS) -> tuple[list[TrainVideo], TensorSource]:
    g = torch.Generator().manual_seed(3)
    frames = {}
    for v, t in enumerate(lengths):
        x = torch.randn(t, 4, 5, 5, generator=g)
        x[:, 0] = (100 * v + torch.arange(t, dtype=torch.float32))[:, None, None]
        frames[f"v{v}"] = x
    videos = [TrainVideo(f"v{v}", v % 3) for v in range(len(lengths))]
    return videos, TensorSource(frames)


def _model() -> FinetuneModel:
    torch.manual_seed(0)
    head = build_model(
        "tp", in_features={"appearance": D}, num_classes=3, head_kwargs={"depth": 2, "node_dim": 4}
    )
    return FinetuneModel(backbones={"appearance": IdBackbone()}, head=head)


def _settings(**kw: object) -> FinetuneSettings:
    base: dict[str, object] = {
        "period": 3,
        "epochs": 3,
        "batch_videos": 2,
        "lr": {"appearance": 0.05},
        "chunk_size": 2,
    }
    base.update(kw)
    return FinetuneSettings(**base)  # type: ignore[arg-type]


def test_every_frame_carries_gradient_once_per_period(tmp_path: Path) -> None:
    videos, source = _data()
    model = _model()
    backbone = model.backbones["appearance"]
    assert isinstance(backbone, IdBackbone)
    per_epoch: list[list[int]] = []  # frames whose feature got a gradient, by epoch

    def on_batch(epoch: int, ids: list[str], items: object) -> None:
        if per_epoch:  # what the previous step recorded
            per_epoch[-1].extend(backbone.grad_ids)
        backbone.grad_ids.clear()
        if len(per_epoch) <= epoch:
            per_epoch.append([])

    history = finetune(model, videos, source, _settings(), tmp_path, on_batch=on_batch)
    per_epoch[-1].extend(backbone.grad_ids)
    everything = sorted(100 * v + t for v, n in enumerate(LENGTHS) for t in range(n))
    assert sorted(i for ids in per_epoch for i in ids) == everything  # each exactly once
    for r, ids in enumerate(per_epoch):
        assert all((i % 100) % 3 == r for i in ids)
    assert [h["frames_with_grad"] for h in history] == [len(ids) for ids in per_epoch]
    assert all(h["frames_total"] == sum(LENGTHS) for h in history)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    for name in ("backbone_appearance.pt", "head.pt", "config.json", CHECKPOINT):
        assert (tmp_path / name).is_file()
    state = torch.load(tmp_path / "backbone_appearance.pt")
    IdBackbone().load_state_dict(state)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    videos, source = _data()
    settings = _settings(period=2, epochs=3)
    straight = _model()
    ref = finetune(straight, videos, source, settings, tmp_path / "a")

    crashed = _model()
    finetune(crashed, videos, source, settings, tmp_path / "b", stop_after=1)
    assert not (tmp_path / "b" / "backbone_appearance.pt").exists()
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["epoch"] == 1
    resumed = _model()  # a new process: fresh weights, everything comes from the checkpoint
    got = finetune(resumed, videos, source, settings, tmp_path / "b")

    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    timings = ("seconds", "cpu_seconds")
    strip = [{k: v for k, v in h.items() if k not in timings} for h in ref]
    assert [{k: v for k, v in h.items() if k not in timings} for h in got] == strip
    # and the training did change the backbone
    assert not torch.equal(
        a["backbones.appearance.conv.weight"], _state(_model())["backbones.appearance.conv.weight"]
    )


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    videos, source = _data()
    finetune(_model(), videos, source, _settings(epochs=1), tmp_path)
    with pytest.raises(ValueError, match="period"):
        finetune(_model(), videos, source, _settings(epochs=2, period=4), tmp_path)
    with pytest.raises(ValueError, match="head_kwargs"):
        finetune(
            _model(), videos, source, _settings(epochs=2), tmp_path, config={"head_kwargs": {}}
        )


class _RunsACommand:
    """Unpickling this calls ``os.system`` (what a crafted checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_planted_checkpoint_runs_nothing(tmp_path: Path) -> None:
    videos, source = _data()
    out = tmp_path / "run"
    finetune(_model(), videos, source, _settings(epochs=1), out, stop_after=1)
    good = torch.load(out / CHECKPOINT, weights_only=True)  # a real one loads safely
    marker = tmp_path / "pwned"
    good["history"].append({"note": _RunsACommand(marker)})
    torch.save(good, out / CHECKPOINT)
    # the payload is live: a plain unpickler runs it
    torch.load(out / CHECKPOINT, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ValueError, match="not a framepool fine-tuning checkpoint that loads"):
        finetune(_model(), videos, source, _settings(epochs=2), out)
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a framepool fine-tuning checkpoint"):
        load_checkpoint(out / CHECKPOINT)
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(tmp_path / CHECKPOINT)


@pytest.mark.parametrize("period", [1, 2])
def test_ddp_one_process_gloo(tmp_path: Path, period: int) -> None:
    videos, source = _data()
    settings = _settings(period=period, epochs=1)
    plain = _model()
    finetune(plain, videos, source, settings, tmp_path / "plain")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        ddp = _model()
        history = finetune(ddp, videos, source, settings, tmp_path / "ddp")
    finally:
        dist.destroy_process_group()
    assert history[0]["frames_total"] == sum(LENGTHS)
    a, b = _state(plain), _state(ddp)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_ddp_step_without_any_gradient_frame(tmp_path: Path) -> None:
    """Videos shorter than K: at epoch 2 no frame carries gradient, the backbone goes unused."""
    videos, source = _data((1, 1, 1, 1))
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        history = finetune(_model(), videos, source, _settings(period=2, epochs=2), tmp_path)
    finally:
        dist.destroy_process_group()
    assert [h["frames_with_grad"] for h in history] == [4, 0]


def test_bf16_autocast_and_activation_checkpointing(tmp_path: Path) -> None:
    """With ``amp`` the backbone's convolution computes in bfloat16 (forward pass and its
    recomputation alike), the epoch's loss is within bfloat16 rounding of float32's, and so are
    the trained backbone's features under autocast."""
    videos, source = _data()
    runs: dict[bool, tuple[FinetuneModel, float, set[torch.dtype]]] = {}
    for amp in (False, True):
        model = _model()
        seen: set[torch.dtype] = set()
        conv = model.backbones["appearance"].conv
        assert isinstance(conv, nn.Module)
        conv.register_forward_hook(lambda _m, _i, out, seen=seen: seen.add(out.dtype))
        settings = _settings(epochs=1, amp=amp, checkpoint=True)
        history = finetune(model, videos, source, settings, tmp_path / f"amp-{amp}")
        runs[amp] = (model, history[0]["loss"], seen)
    assert runs[False][2] == {torch.float32} and runs[True][2] == {torch.bfloat16}
    assert runs[True][1] == pytest.approx(runs[False][1], rel=2e-2)
    backbone = runs[True][0].backbones["appearance"].eval()
    x = source.frames("v0")["appearance"]
    assert isinstance(x, torch.Tensor)
    with torch.no_grad():
        full = backbone(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = backbone(x)
    assert full.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, rtol=2e-2, atol=2e-2)


class RememberingSource(TensorSource):
    def __init__(self, frames: dict[str, torch.Tensor]) -> None:
        super().__init__(frames)
        self.memory = FeatureMemory(None)

    def known(self, video_id: str) -> dict[str, torch.Tensor] | None:
        feats = self.memory.get(video_id, "appearance", int(self._frames[video_id].shape[0]))
        return None if feats is None else {"appearance": torch.from_numpy(feats).float()}

    def remember(self, video_id: str, features: dict[str, torch.Tensor]) -> None:
        for stream, f in features.items():
            self.memory.put(video_id, stream, f)


def test_feature_memory_runs_the_backbone_on_the_subset_only(tmp_path: Path) -> None:
    videos, plain = _data()
    source = RememberingSource(plain._frames)
    model = _model()
    seen: list[int] = []
    model.backbones["appearance"].register_forward_hook(
        lambda m, args, out: seen.append(int(args[0].shape[0]))
    )
    per_epoch: list[int] = []

    def on_batch(epoch: int, ids: list[str], items: object) -> None:
        while len(per_epoch) < epoch:
            per_epoch.append(sum(seen))
            seen.clear()

    finetune(model, videos, source, _settings(), tmp_path, on_batch=on_batch)
    per_epoch.append(sum(seen))
    total = sum(LENGTHS)
    subsets = [sum(len(range(r, t, 3)) for t in LENGTHS) for r in range(3)]
    assert per_epoch == [total, subsets[1], subsets[2]]
    assert all(source.memory.get(v.video_id, "appearance", t) is not None
               for v, t in zip(videos, LENGTHS, strict=True))  # fmt: skip


def test_feature_memory_changes_nothing_at_period_one(tmp_path: Path) -> None:
    videos, plain = _data()
    a, b = _model(), _model()
    finetune(a, videos, plain, _settings(period=1, epochs=2), tmp_path / "a")
    finetune(
        b, videos, RememberingSource(plain._frames), _settings(period=1, epochs=2), tmp_path / "b"
    )
    for k, v in _state(a).items():
        assert torch.equal(v, _state(b)[k]), k
