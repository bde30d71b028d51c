"""The surrogate-gradient core against the fully unfolded model (float64, tiny backbone)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aggregator.finetune import (
    FinetuneModel,
    VideoBatchItem,
    grad_multiplier,
    periodic_subset,
    surrogate_features,
)
from aggregator.heads import build_model


class TinyBackbone(nn.Module):
    """conv -> BN -> ReLU -> global average pool -> linear: [n, C, 6, 6] -> [n, d]."""

    def __init__(self, c_in: int = 3, d: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, d)
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


LENGTHS = (7, 3, 5)


def _model(streams: tuple[str, ...] = ("appearance",)) -> FinetuneModel:
    torch.manual_seed(0)
    chans = {"appearance": 3, "motion": 4}
    head = build_model(
        "tp",
        in_features={s: 5 for s in streams},
        num_classes=3,
        head_kwargs={"depth": 2, "node_dim": 4, "dropout": 0.0},
    )
    model = FinetuneModel(
        backbones={s: TinyBackbone(chans[s]) for s in streams}, head=head
    ).double()
    return model.train()


def _videos(streams: tuple[str, ...] = ("appearance",)) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    chans = {"appearance": 3, "motion": 4}
    return [
        {s: torch.randn(t, chans[s], 6, 6, generator=g, dtype=torch.float64) for s in streams}
        for t in LENGTHS
    ]


LABELS = torch.tensor([0, 2, 1])


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _unfolded_grads(
    model: FinetuneModel, videos: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Reference: the unfolded model, each video's frames in one backbone call, all with grad."""
    x = {
        s: nn.utils.rnn.pad_sequence([model.backbones[s](v[s]) for v in videos], batch_first=True)
        for s in model.streams
    }
    nn.functional.cross_entropy(model.head(x, torch.tensor(LENGTHS)), LABELS).backward()
    return _grads(model)


def _surrogate_grads(
    model: FinetuneModel,
    videos: list[dict[str, torch.Tensor]],
    period: int,
    epoch: int,
    *,
    scale: str = "sum",
    checkpoint: bool = False,
    known: bool = False,
) -> dict[str, torch.Tensor]:
    items = []
    for v in videos:
        t = next(iter(v.values())).shape[0]
        kn = None
        if known:
            with torch.no_grad():
                kn = {s: model.backbones[s](v[s]) for s in model.streams}
        grad_index = periodic_subset(t, period, epoch)
        items.append(VideoBatchItem(frames=v, grad_index=grad_index, known=kn))
    logits = model(
        items, chunk_size=2, grad_factor=grad_multiplier(period, scale), checkpoint=checkpoint
    )
    nn.functional.cross_entropy(logits, LABELS).backward()
    return _grads(model)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        assert err <= tol * (1 + b[name].abs().max().item()), (name, err)


def test_periodic_subset() -> None:
    assert periodic_subset(10, 4, 0).tolist() == [0, 4, 8]
    assert periodic_subset(10, 4, 5).tolist() == [1, 5, 9]
    assert periodic_subset(10, 1, 3).tolist() == list(range(10))
    assert periodic_subset(2, 4, 3).tolist() == []
    with pytest.raises(ValueError, match="period"):
        periodic_subset(5, 0, 0)


@pytest.mark.parametrize("streams", [("appearance",), ("appearance", "motion")])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_period_one_is_the_exact_gradient(streams: tuple[str, ...], checkpoint: bool) -> None:
    model, videos = _model(streams), _videos(streams)
    ref = _unfolded_grads(model, videos)
    got = _surrogate_grads(model, videos, 1, 0, scale="unbiased", checkpoint=checkpoint)
    assert any("backbones" in n for n in got)
    _assert_close(got, ref, 1e-10)


def test_residues_sum_to_the_exact_gradient() -> None:
    """Features are the same whatever r, so the K literal (sum) subset gradients add up to it."""
    period = 3
    model, videos = _model(), _videos()
    ref = _unfolded_grads(model, videos)
    total: dict[str, torch.Tensor] = {}
    for r in range(period):
        g = _surrogate_grads(model, videos, period, r, scale="sum")
        for n, v in g.items():
            if n.startswith("backbones"):
                total[n] = total.get(n, torch.zeros_like(v)) + v
            else:  # the head always gets the exact gradient
                _assert_close({n: v}, {n: ref[n]}, 1e-10)
    _assert_close(total, {n: v for n, v in ref.items() if n.startswith("backbones")}, 1e-10)


def test_unbiased_scale_is_k_times_the_literal_sum() -> None:
    model, videos = _model(), _videos()
    lit = _surrogate_grads(model, videos, 4, 1, scale="sum")
    unb = _surrogate_grads(model, videos, 4, 1, scale="unbiased")
    scaled = {n: (4 * v if n.startswith("backbones") else v) for n, v in lit.items()}
    _assert_close(unb, scaled, 1e-12)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_known_features_equal_computed_ones(checkpoint: bool) -> None:
    model, videos = _model(), _videos()
    a = _surrogate_grads(model, videos, 2, 1, checkpoint=checkpoint)
    b = _surrogate_grads(model, videos, 2, 1, checkpoint=checkpoint, known=True)
    _assert_close(a, b, 1e-12)


def test_frames_outside_the_subset_carry_no_gradient() -> None:
    torch.manual_seed(0)
    net = TinyBackbone().double().eval()
    frames = torch.randn(6, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    feats = surrogate_features(net, frames, torch.tensor([1, 4]), chunk_size=1)
    feats.sum().backward()
    assert frames.grad is not None
    has_grad = frames.grad.flatten(1).abs().sum(1) > 0
    assert has_grad.tolist() == [False, True, False, False, True, False]
    with torch.no_grad():
        ref = net(frames)
    assert torch.allclose(feats, ref, atol=1e-12)


def test_batchnorm_stays_frozen_in_train_mode() -> None:
    model = _model()
    before = model.backbones["appearance"].bn.running_mean.clone()
    _surrogate_grads(model, _videos(), 2, 0)
    assert not model.backbones["appearance"].bn.training
    assert model.head.training
    assert torch.equal(before, model.backbones["appearance"].bn.running_mean)


def _saved_bytes(period: int, checkpoint: bool) -> int:
    """Bytes autograd keeps for the backward pass of one 24-frame video's features."""
    torch.manual_seed(0)
    net = TinyBackbone().eval()
    frames = torch.randn(24, 3, 6, 6)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        feats = surrogate_features(
            net, frames, periodic_subset(24, period, 0), chunk_size=3, checkpoint=checkpoint
        )
    feats.sum().backward()
    return saved


def test_memory_scales_with_the_subset_not_the_video() -> None:
    full, quarter = _saved_bytes(1, False), _saved_bytes(4, False)
    assert quarter * 4 == pytest.approx(full, rel=0.05)
    # recomputing in the backward pass keeps only the gradient frames' inputs
    frame_bytes = 3 * 6 * 6 * 4
    assert _saved_bytes(1, True) == 24 * frame_bytes < full / 2
    assert _saved_bytes(4, True) == pytest.approx(6 * frame_bytes, rel=0.1)


def test_backbone_calls_batch_frames_across_videos() -> None:
    model, videos = _model(), _videos()
    sizes: list[int] = []
    model.backbones["appearance"].register_forward_hook(
        lambda m, args, out: sizes.append(int(args[0].shape[0]))
    )
    items = [
        VideoBatchItem(frames=v, grad_index=periodic_subset(t, 4, 1))
        for v, t in zip(videos, LENGTHS, strict=True)
    ]
    model(items, chunk_size=4)
    # 15 frames: 2 + 1 + 1 with gradient (one call), 11 without (4 + 4 + 3)
    assert sizes == [4, 4, 4, 3]
