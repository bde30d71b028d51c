"""The trainers' configs: one base, the train_args round trip, the dispatch by head, and the
runtime helpers every trainer shares."""

from __future__ import annotations

import random

import pytest
import torch

from aggregator.streams import MAP_STREAMS
from aggregator.train_config import BaseTrainConfig, MapTrainConfig, TrainConfig
from aggregator.trainers import config_class, config_of
from extractor.runtime import parse_precision, resolve_device, resolve_precision, seeded_run

# train_args of an stpn run as the map trainer wrote them before it took a config
OLD_STPN_ARGS = {
    "head": "stpn",
    "streams": ["appearance_map", "motion_map"],
    "head_kwargs": {"out_dim": 32},
    "train_split": "train",
    "test_split": "test",
    "val_fraction": 0.1,
    "val_groups": "auto",
    "epochs": 3,
    "batch_size": 8,
    "optimizer": "adam",
    "lr": 0.001,
    "weight_decay": 0.0001,
    "patience": 10,
    "grad_clip": 40.0,
    "max_frames": None,
    "seed": 3,
    "device": "cpu",
    "threads": None,
}


def test_every_trainer_config_shares_the_base_and_round_trips() -> None:
    for config in (TrainConfig(head="gap", streams=("appearance", "motion")), MapTrainConfig()):
        assert isinstance(config, BaseTrainConfig)
        assert type(config).from_dict(config.to_dict()) == config
    stpn = config_of("stpn", OLD_STPN_ARGS)
    assert isinstance(stpn, MapTrainConfig) and stpn.to_dict() == OLD_STPN_ARGS
    assert config_class("tp") is TrainConfig and config_class("stpn") is MapTrainConfig


def test_map_config_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="does not read map streams"):
        MapTrainConfig(head="tp")
    with pytest.raises(ValueError, match="appearance_map"):
        MapTrainConfig(streams=("appearance",))
    with pytest.raises(ValueError, match="batch_size >= 2"):
        MapTrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="unknown training options \\['levels'\\]"):
        config_of("stpn", {**OLD_STPN_ARGS, "levels": 3})
    assert MapTrainConfig().streams == MAP_STREAMS


def test_precision_has_one_vocabulary() -> None:
    assert TrainConfig(precision="bfloat16").precision == "bf16"  # as older configs spell it
    assert TrainConfig(precision="float32").precision == "fp32"
    assert parse_precision("bfloat16") == "bf16"
    assert resolve_precision("float32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="'half'"):
        parse_precision("half")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'gpu'"):
        resolve_device("gpu")


def test_seeded_run_gives_back_threads_and_random_streams() -> None:
    threads = torch.get_num_threads()
    random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), torch.rand(1).item())
    random.seed(11)
    torch.manual_seed(11)
    with seeded_run(0, threads=1):
        assert torch.get_num_threads() == 1
        inside = torch.rand(1).item()
    assert torch.get_num_threads() == threads
    assert (random.random(), torch.rand(1).item()) == expected
    with seeded_run(0):
        assert torch.rand(1).item() == inside  # the same seed, the same draws
