"""End-to-end fine-tuning of the backbones with a video head (``framepool finetune``).

- :mod:`~aggregator.finetune.surrogate`: the surrogate gradient over periodic frame subsets
  (:class:`FinetuneModel`, :func:`surrogate_features`, :func:`step_in_chunks`);
- :mod:`~aggregator.finetune.maps`: backbones that output spatial maps, for map heads (``stpn``);
- :mod:`~aggregator.finetune.inputs`: decoded inputs cached on disk or in memory, stored and
  remembered features for the frames outside the subset;
- :mod:`~aggregator.finetune.standardize`: the head's input standardisation from its training
  videos;
- :mod:`~aggregator.finetune.sources`: the training videos and where their inputs come from;
- :mod:`~aggregator.finetune.checkpoint`: the loop's checkpoint, read safely, and resumption;
- :mod:`~aggregator.finetune.loop`: the training loop (SGD, DDP, checkpoints, outputs);
- :mod:`~aggregator.finetune.job`: a whole job on video files (:func:`run_finetune_job`).
"""

from aggregator.finetune.checkpoint import load_checkpoint
from aggregator.finetune.inputs import DecodedSource, FeatureMemory, InputCache
from aggregator.finetune.job import run_finetune_job, start_extractor
from aggregator.finetune.loop import FinetuneSettings, finetune
from aggregator.finetune.maps import MAP_HEADS, MapBackbone, build_map_model
from aggregator.finetune.sources import TrainVideo, VideoSource
from aggregator.finetune.standardize import fit_standardizer
from aggregator.finetune.surrogate import (
    STREAMS,
    FinetuneModel,
    FrameInputs,
    Frames,
    GradScale,
    VideoBatchItem,
    batch_surrogate_features,
    freeze_batchnorm,
    grad_multiplier,
    loss_and_correct,
    n_frames_of,
    periodic_subset,
    scale_grad,
    step_in_chunks,
    surrogate_features,
)

__all__ = [
    "MAP_HEADS",
    "STREAMS",
    "DecodedSource",
    "FeatureMemory",
    "FinetuneModel",
    "FinetuneSettings",
    "FrameInputs",
    "Frames",
    "GradScale",
    "InputCache",
    "MapBackbone",
    "TrainVideo",
    "VideoBatchItem",
    "VideoSource",
    "batch_surrogate_features",
    "build_map_model",
    "finetune",
    "fit_standardizer",
    "freeze_batchnorm",
    "grad_multiplier",
    "load_checkpoint",
    "loss_and_correct",
    "n_frames_of",
    "periodic_subset",
    "run_finetune_job",
    "scale_grad",
    "start_extractor",
    "step_in_chunks",
    "surrogate_features",
]
