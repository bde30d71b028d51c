"""Fine-tuning with the backward pass in chunks of ``grad_frames`` frames: the same gradients as
the one-graph step, and activation memory that does not grow with the video's length."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from aggregator.finetune import (
    FinetuneModel,
    VideoBatchItem,
    loss_and_correct,
    periodic_subset,
    step_in_chunks,
)
from aggregator.finetune.loop import finetune
from aggregator.finetune.memory import MAX_GRAD_FRAMES, activation_bytes, grad_frames_for
from aggregator.heads import build_model
from tests.aggregator.finetune.test_train import _data, _model, _settings

D = 5


class Tiny(nn.Module):
    """A frame's feature from that frame alone (BatchNorm in eval mode under FinetuneModel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x)))))
        return self.fc(h.mean(dim=(2, 3)))


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> FinetuneModel:
    torch.manual_seed(seed)
    head = build_model(
        "tp", in_features={"appearance": D}, num_classes=3, head_kwargs={"depth": 2, "node_dim": 4}
    )
    model = FinetuneModel(backbones={"appearance": Tiny()}, head=head).to(dtype)
    return model.train()


def batch(
    lengths: tuple[int, ...], period: int, epoch: int, size: int = 16
) -> list[VideoBatchItem]:
    g = torch.Generator().manual_seed(1)
    return [
        VideoBatchItem(
            frames={"appearance": torch.randn(t, 3, size, size, generator=g, dtype=torch.float64)},
            grad_index=periodic_subset(t, period, epoch),
        )
        for t in lengths
    ]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("period", "grad_frames"), [(1, 1), (1, 4), (3, 2), (3, 100)])
def test_chunked_step_has_the_one_graph_gradients(period: int, grad_frames: int) -> None:
    items = batch((7, 3, 10), period, epoch=1)
    labels = torch.tensor([0, 2, 1])
    factor = float(period)

    ref = tiny_model()
    loss_ref, correct_ref = loss_and_correct(ref(items, chunk_size=4, grad_factor=factor), labels)
    loss_ref.backward()

    chunked = tiny_model()
    loss, correct = step_in_chunks(
        chunked, items, labels, grad_frames=grad_frames, chunk_size=4, grad_factor=factor
    )
    assert (
        float(loss) == pytest.approx(float(loss_ref.detach()), rel=1e-12) and correct == correct_ref
    )
    a, b = grads(ref), grads(chunked)
    assert a.keys() == b.keys() and any("backbones" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-12, msg=k)


def test_chunked_step_with_known_features_for_the_other_frames() -> None:
    items = batch((6, 9), period=3, epoch=2)
    known = [torch.randn(it.n_frames, D, dtype=torch.float64) for it in items]
    items = [
        VideoBatchItem(frames=it.frames, grad_index=it.grad_index, known={"appearance": k})
        for it, k in zip(items, known, strict=True)
    ]
    labels = torch.tensor([1, 0])
    ref = tiny_model()
    loss_and_correct(ref(items, grad_factor=3.0), labels)[0].backward()
    chunked = tiny_model()
    step_in_chunks(chunked, items, labels, grad_frames=2, grad_factor=3.0)
    for k, v in grads(ref).items():
        torch.testing.assert_close(grads(chunked)[k], v, rtol=1e-9, atol=1e-12, msg=k)


class SavedBytes:
    """Bytes autograd holds for backward passes now, and the most it held at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor) -> object:
        n = t.numel() * t.element_size()
        self.now += n
        self.peak = max(self.peak, self.now)
        box = _Box(t)
        weakref.finalize(box, self._free, n)  # when the graph lets go of it
        return box

    def _free(self, n: int) -> None:
        self.now -= n

    @contextmanager
    def watch(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda box: box.t):
            yield self


class _Box:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _peak_saved(lengths: tuple[int, ...], grad_frames: int | None) -> int:
    model = tiny_model(dtype=torch.float32)
    items = [
        VideoBatchItem(frames={"appearance": it.frames["appearance"].float()}, grad_index=gi)
        for it in batch(lengths, period=1, epoch=0, size=24)
        for gi in [it.grad_index]
    ]
    labels = torch.tensor([0, 1][: len(items)])
    with SavedBytes().watch() as saved:
        if grad_frames is None:
            loss_and_correct(model(items, chunk_size=4), labels)[0].backward()
        else:
            step_in_chunks(model, items, labels, grad_frames=grad_frames, chunk_size=4)
    assert saved.now == 0  # everything was released after the backward passes
    return saved.peak


def test_activation_memory_is_bounded_by_grad_frames_not_by_t() -> None:
    short, long = (8, 6), (80, 60)  # the second batch is 10x longer
    one_graph = [_peak_saved(short, None), _peak_saved(long, None)]
    chunked = [_peak_saved(short, 4), _peak_saved(long, 4)]
    assert one_graph[1] > 8 * one_graph[0]  # the one-graph step grows with T
    # in chunks: the same peak for 10x the frames, beyond the head's few [T, d] tensors
    head_share = 4 * 10 * (80 + 60) * D * 8
    assert chunked[1] <= chunked[0] + head_share
    assert chunked[1] < one_graph[1] / 5


def test_finetune_loop_in_chunks_equals_the_one_graph_loop(tmp_path: Path) -> None:
    videos, source = _data()
    settings = _settings(period=2, epochs=2)
    plain = _model()
    h1 = finetune(plain, videos, source, settings, tmp_path / "plain")
    chunked = _model()
    h2 = finetune(chunked, videos, source, _settings(period=2, epochs=2, grad_frames=2),
                  tmp_path / "chunked")  # fmt: skip
    assert [h["frames_with_grad"] for h in h1] == [h["frames_with_grad"] for h in h2]
    assert [h["loss"] for h in h2] == pytest.approx([h["loss"] for h in h1], rel=1e-5)
    for (k, a), b in zip(plain.state_dict().items(), chunked.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=k)
    # grad_frames is not part of what a resumed run must share
    more = _settings(period=2, epochs=3, grad_frames=5)
    assert len(finetune(_model(), videos, source, more, tmp_path / "plain")) == 3


def test_grad_frames_must_be_positive() -> None:
    with pytest.raises(ValueError, match="grad_frames"):
        _settings(grad_frames=0)
    with pytest.raises(ValueError, match="grad_frames"):
        step_in_chunks(tiny_model(), batch((3,), 1, 0), torch.tensor([0]), grad_frames=0)


def test_activation_bytes_are_what_autograd_keeps() -> None:
    """conv keeps its input, ReLU its output (in place: the conv's output), parameters left out."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(inplace=True))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert activation_bytes(net, x) == 4 * (2 * 3 * 64 + 2 * 4 * 64)
    with torch.no_grad():
        assert activation_bytes(net, x.detach()) == 4 * (2 * 3 * 64 + 2 * 4 * 64)  # grad forced


def test_grad_frames_follow_the_budget() -> None:
    per_frame = {"appearance": 100 << 20, "motion": 120 << 20}  # the worst stream sizes it
    assert grad_frames_for(per_frame, 3 * (120 << 20) * 16) == 16
    assert grad_frames_for(per_frame, 3 * (120 << 20) * 16 - 1) == 15
    assert grad_frames_for(per_frame, 6 << 30) == (6 << 30) // 3 // (120 << 20) == 17
    assert grad_frames_for(per_frame, 0) == 1  # at least one frame
    assert grad_frames_for({"appearance": 1}, 1 << 40) == MAX_GRAD_FRAMES
    with pytest.raises(ValueError, match="no stream"):
        grad_frames_for({}, 1 << 30)
