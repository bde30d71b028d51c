"""Fine-tuning the map head (``stpn``) and ``stcb`` end to end: map backbones, the surrogate
gradient on maps (one graph against the chunked backward pass), and ``framepool finetune`` on real
clips, re-extracted and evaluated, with the head's logits equal to those of an upload's maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aggregator.evaluate import evaluate_run
from aggregator.finetune import (
    VideoBatchItem,
    grad_multiplier,
    periodic_subset,
    step_in_chunks,
)
from aggregator.finetune.maps import (
    MapBackbone,
    StridedFrames,
    build_map_model,
    map_projection,
)
from aggregator.heads import build_model
from aggregator.maps.data import MapDataset
from aggregator.maps.predict import MapRun
from aggregator.run_loader import TorchRun, load_run
from api.cli import main
from api.service.maps import extractor_from_config
from extractor.backbones import build_backbone
from extractor.features import FeatureExtractor
from extractor.spec import BackboneSpec
from storage import FeatureStore


def _resnet(stream: str) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(stream, "random", "resnet18")


def test_map_backbone_mean_is_the_pooled_feature() -> None:
    net = _resnet("appearance").double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        pooled = net(x)  # [2, 512]
        fmap = MapBackbone(net)(x)  # [2, 2, 2, 512]
        proj = map_projection(512, 8, seed=3)[0].double()
        reduced = MapBackbone(net, proj)(x)
    assert fmap.shape == (2, 2, 2, 512) and reduced.shape == (2, 2, 2, 8)
    assert torch.allclose(fmap.mean(dim=(1, 2)), pooled, atol=1e-10)
    assert torch.allclose(reduced.mean(dim=(1, 2)), pooled @ proj, atol=1e-10)


def test_projection_is_the_one_extract_records() -> None:
    spec = BackboneSpec(streams=("appearance",), arch="resnet18", weights="random")
    fx = FeatureExtractor(spec, device="cpu")
    fx.set_maps(("appearance_map",), dim=8, seed=3)
    recorded = fx.config()["appearance_map"]["projection"]
    assert map_projection(512, 8, seed=3)[1] == recorded["sha256"]
    assert map_projection(512, 8, seed=4)[1] != recorded["sha256"]


def test_strided_frames_take_every_sth_frame() -> None:
    frames = torch.arange(7.0)[:, None]
    strided = StridedFrames(frames, 3)
    assert strided.n_frames == 3  # frames 0, 3, 6
    assert strided.take(torch.tensor([0, 2])).flatten().tolist() == [0.0, 6.0]
    with pytest.raises(ValueError, match="stride"):
        StridedFrames(frames, 0)


def _stpn_model() -> nn.Module:
    head = build_model(
        "stpn",
        in_features={"appearance_map": 4, "motion_map": 4},
        num_classes=3,
        head_kwargs={"out_dim": 32, "temporal_dim": 16, "attention_dim": 8, "dropout": 0.0},
    )
    backbones = {s: _resnet(s) for s in ("appearance", "motion")}
    model = build_map_model(
        backbones, head, feature_dims={"appearance": 512, "motion": 512}, dim=4, seed=1
    )
    return model.train()


def _items(epoch: int, period: int) -> list[VideoBatchItem]:
    g = torch.Generator().manual_seed(1)
    items = []
    for t in (3, 2):
        frames = {
            "appearance": torch.randn(t, 3, 64, 64, generator=g),
            "motion": torch.randn(t, 20, 64, 64, generator=g),
        }
        items.append(VideoBatchItem(frames=frames, grad_index=periodic_subset(t, period, epoch)))
    return items


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_chunked_backward_on_maps_equals_one_graph() -> None:
    """--grad-frames on maps: the same gradients as one graph, which reach both backbones."""
    model = _stpn_model()
    labels = torch.tensor([0, 2])
    factor = grad_multiplier(2, "unbiased")
    logits = model(_items(1, 2), chunk_size=2, grad_factor=factor)
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    whole = _grads(model)
    chunked_loss, _ = step_in_chunks(
        model, _items(1, 2), labels, grad_frames=1, chunk_size=2, grad_factor=factor
    )
    chunked = _grads(model)
    assert float(chunked_loss) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert whole.keys() == chunked.keys()
    assert any(k.startswith("backbones.motion.net.") for k in whole)
    assert any(k.startswith("head.attention.") for k in whole)
    for name in whole:
        err = (whole[name] - chunked[name]).abs().max().item()
        assert err <= 1e-4 * (1 + whole[name].abs().max().item()), (name, err)


# --------------------------------------------------------------------------- real clips


def _args(labels: Path, out: Path, *extra: str) -> list[str]:
    videos = [line.split(",")[0] for line in labels.read_text().splitlines()[1:]]
    return [
        "finetune", "--videos", *videos, "--labels", str(labels), "--out", str(out),
        "--arch", "resnet18", "--weights", "random", "--max-frames", "4", "--period", "2",
        "--batch-videos", "2", "--epochs", "1", "--device", "cpu", *extra,
    ]  # fmt: skip


def test_map_options_are_checked(labelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert main(_args(labelled, out, "--head", "stpn")) == 2  # one stream only
    assert (
        main(_args(labelled, out, "--head", "stpn", "--streams", "both", "--reuse-features")) == 2
    )
    assert main(_args(labelled, out, "--head", "tp", "--map-dim", "8")) == 2
    assert (
        main(_args(labelled, out, "--head", "stpn", "--streams", "both", "--map-stride", "0")) == 2
    )
    assert not out.exists()


def test_finetune_stpn_reextract_evaluate_and_serve_path(labelled: Path, tmp_path: Path) -> None:
    """Fine-tune stpn on maps (chunked backward), re-extract the maps with the tuned backbones,
    evaluate: the logits equal those of the maps computed on the fly from the clip."""
    out, store = tmp_path / "run", tmp_path / "tuned.zarr"
    extra = ("--head", "stpn", "--streams", "both", "--map-dim", "8", "--map-stride", "2")
    extra += ("--grad-frames", "1", "--reextract", str(store))
    assert main(_args(labelled, out, *extra)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["streams"] == ["appearance_map", "motion_map"]
    assert config["in_features"] == {"appearance_map": 8, "motion_map": 8}
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    assert epochs[0]["frames_total"] == 4  # 2 map frames (of 4 kept, stride 2) x 2 train videos
    assert epochs[0]["frames_with_grad"] == 2  # frame 0 of each (K = 2, epoch 0)
    # the saved backbones are plain ResNets again
    net = build_backbone("appearance", str(out / "backbone_appearance.pt"), "resnet18")
    assert isinstance(net, nn.Module)

    fs = FeatureStore.open(store)
    assert fs.read("mm_test", "appearance_map").shape == (2, 7, 7, 8)
    assert fs.video_attrs("mm_test")["map_frame_indices"] == [0, 109]  # of 4 evenly kept frames
    predictor = load_run(out)
    assert isinstance(predictor, MapRun)
    metrics = evaluate_run(out, store, split="test", write=False)
    assert metrics["head"] == "stpn" and metrics["n_test"] == 1

    stored = predictor.logits_of(MapDataset(fs, ["mm_test"], predictor.streams))[0]
    fx = extractor_from_config({s: predictor.extractor[s] for s in predictor.extractor_streams})
    clip = Path(fs.video_attrs("mm_test")["source"])
    video = fx.extract_file(clip, max_frames=4, maps=True)
    assert video.features["motion_map"].shape == (2, 7, 7, 8)
    live = predictor.predict_logits({s: video.features[s] for s in predictor.streams})
    np.testing.assert_allclose(live, stored, rtol=1e-5, atol=1e-6)
    proba = predictor.predict_proba({s: video.features[s] for s in predictor.streams})
    assert proba.sum() == pytest.approx(1.0)


def test_finetune_stcb_then_evaluate(labelled: Path, tmp_path: Path) -> None:
    """stcb fuses the streams itself; fine-tuned end to end it is evaluated like any run."""
    out, store = tmp_path / "run", tmp_path / "tuned.zarr"
    extra = ("--head", "stcb", "--streams", "both", "--reextract", str(store))
    assert main(_args(labelled, out, *extra)) == 0
    assert isinstance(load_run(out), TorchRun)
    metrics = evaluate_run(out, store, split="test", write=False)
    assert metrics["head"] == "stcb" and metrics["n_test"] == 1
