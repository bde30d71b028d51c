"""Dense optical flow between consecutive grayscale frames, four backends.

A backend maps two uint8 grayscale frames ``[H, W]`` to a float32 flow field ``[H, W, 2]``
(``[..., 0]`` = dx, horizontal; ``[..., 1]`` = dy, vertical; in pixels of the input frames).
Each reports ``config()``: its name and every parameter that changes its output, recorded in the
store so that features can be traced to exactly how their flow was computed.

- ``dis``: OpenCV DIS (fast on CPU); preset ``fast`` by default (``ultrafast``/``medium`` too).
- ``farneback``: OpenCV Farneback polynomial expansion, the usual parameter set.
- ``tvl1``: OpenCV contrib Dual TV-L1, the reference two-stream pipelines' choice; slow on CPU.
- ``raft``: torchvision RAFT (large or small, detected from the weights file) on a GPU; weights
  come from a local file, never downloaded. Pairs from all decode workers are batched, float32 or
  bfloat16 autocast, and the quantisation to uint8 happens on the GPU.

OpenCV flow objects are not thread-safe: give each worker thread its own :meth:`clone`.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from extractor.transforms import quantize_flow_batch

log = logging.getLogger(__name__)

FLOW_BACKENDS = ("dis", "farneback", "tvl1", "raft")
RAFT_DTYPES = ("float32", "bfloat16")
_DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (a URL read through fsspec, see :mod:`extractor.urls`)."""
    from extractor.urls import is_url, open_url

    h = hashlib.sha256()
    with open_url(str(path)) if is_url(path) else open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FlowBackend(Protocol):
    name: ClassVar[str]

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """Flow ``[H, W, 2]`` float32 from grayscale ``prev`` to ``nxt`` (uint8 ``[H, W]``)."""
        ...

    def config(self) -> dict[str, Any]:
        """``{"backend": name, **parameters}``, JSON-able."""
        ...

    def clone(self) -> FlowBackend:
        """An independent instance with the same parameters (one per thread)."""
        ...


def _check_pair(prev: np.ndarray, nxt: np.ndarray) -> None:
    if prev.shape != nxt.shape or prev.ndim != 2 or prev.dtype != np.uint8:
        raise ValueError(
            f"expected two uint8 grayscale frames of one size, got {prev.shape} {prev.dtype} and "
            f"{nxt.shape} {nxt.dtype}"
        )


def _dense(algo: Any, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Run an OpenCV ``DenseOpticalFlow`` object (its stubs insist on a flow argument)."""
    return np.asarray(algo.calc(prev, nxt, None), dtype=np.float32)


def _num(v: Any) -> Any:
    if isinstance(v, bool | int):
        return v
    return float(np.float32(v).round(6))


class DisFlow:
    """OpenCV DIS optical flow (Kroeger et al.), from a preset."""

    name: ClassVar[str] = "dis"

    def __init__(self, preset: str = "fast") -> None:
        if preset not in _DIS_PRESETS:
            raise ValueError(f"unknown DIS preset {preset!r}; choose from {sorted(_DIS_PRESETS)}")
        self.preset = preset
        self._dis = cv2.DISOpticalFlow.create(_DIS_PRESETS[preset])

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        _check_pair(prev, nxt)
        return _dense(self._dis, prev, nxt)

    def config(self) -> dict[str, Any]:
        d = self._dis
        return {
            "backend": self.name,
            "preset": self.preset,
            "finest_scale": d.getFinestScale(),
            "patch_size": d.getPatchSize(),
            "patch_stride": d.getPatchStride(),
            "gradient_descent_iterations": d.getGradientDescentIterations(),
            "variational_refinement_iterations": d.getVariationalRefinementIterations(),
            "variational_refinement_alpha": _num(d.getVariationalRefinementAlpha()),
            "variational_refinement_delta": _num(d.getVariationalRefinementDelta()),
            "variational_refinement_gamma": _num(d.getVariationalRefinementGamma()),
            "use_mean_normalization": bool(d.getUseMeanNormalization()),
            "use_spatial_propagation": bool(d.getUseSpatialPropagation()),
        }

    def clone(self) -> DisFlow:
        return DisFlow(self.preset)


class FarnebackFlow:
    """OpenCV Farneback flow with the customary parameters."""

    name: ClassVar[str] = "farneback"

    def __init__(
        self,
        *,
        pyr_scale: float = 0.5,
        levels: int = 3,
        winsize: int = 15,
        iterations: int = 3,
        poly_n: int = 5,
        poly_sigma: float = 1.2,
    ) -> None:
        self.params: dict[str, Any] = {
            "pyr_scale": pyr_scale,
            "levels": levels,
            "winsize": winsize,
            "iterations": iterations,
            "poly_n": poly_n,
            "poly_sigma": poly_sigma,
        }

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        _check_pair(prev, nxt)
        p = self.params
        return cv2.calcOpticalFlowFarneback(  # type: ignore[call-overload, unused-ignore]
            prev,
            nxt,
            None,
            p["pyr_scale"],
            p["levels"],
            p["winsize"],
            p["iterations"],
            p["poly_n"],
            p["poly_sigma"],
            0,
        )

    def config(self) -> dict[str, Any]:
        return {"backend": self.name, **self.params}

    def clone(self) -> FarnebackFlow:
        return FarnebackFlow(**self.params)


class TvL1Flow:
    """OpenCV contrib Dual TV-L1 flow (Zach et al.) with OpenCV's default parameters."""

    name: ClassVar[str] = "tvl1"

    def __init__(self) -> None:
        optflow = getattr(cv2, "optflow", None)
        if optflow is None or not hasattr(optflow, "DualTVL1OpticalFlow_create"):
            raise RuntimeError(
                "--flow tvl1 needs OpenCV's contrib modules (cv2.optflow); install "
                "opencv-contrib-python-headless instead of opencv-python"
            )
        self._tvl1 = optflow.DualTVL1OpticalFlow_create()

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        _check_pair(prev, nxt)
        return _dense(self._tvl1, prev, nxt)

    def config(self) -> dict[str, Any]:
        t = self._tvl1
        return {
            "backend": self.name,
            "tau": _num(t.getTau()),
            "lambda": _num(t.getLambda()),
            "theta": _num(t.getTheta()),
            "scales": t.getScalesNumber(),
            "warps": t.getWarpingsNumber(),
            "epsilon": _num(t.getEpsilon()),
            "inner_iterations": t.getInnerIterations(),
            "outer_iterations": t.getOuterIterations(),
            "scale_step": _num(t.getScaleStep()),
            "gamma": _num(t.getGamma()),
            "median_filtering": t.getMedianFiltering(),
        }

    def clone(self) -> TvL1Flow:
        return TvL1Flow()


def _load_raft(path: Path) -> tuple[torch.nn.Module, str]:
    from torchvision.models.optical_flow import raft_large, raft_small

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read RAFT weights {str(path)!r}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"RAFT weights {str(path)!r} are not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    errors = []
    candidates = [("raft_large", raft_large), ("raft_small", raft_small)]
    if sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor)) < 2_000_000:
        candidates.reverse()  # raft_small has about 1M parameters, raft_large about 5M
    for arch, build in candidates:
        model = build(weights=None, progress=False)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            errors.append(f"{arch}: {str(exc).splitlines()[0]}")
            continue
        return model, arch
    raise ValueError(f"{str(path)!r} is not a torchvision RAFT state dict ({'; '.join(errors)})")


class _PairBatcher:
    """Runs a batched flow function on pairs that many threads submit one at a time.

    Each :meth:`__call__` queues its pair and blocks; one daemon thread takes the queued pairs (up
    to ``max_batch``, waiting at most ``wait_s`` for more after the first), runs them as batches
    of equal frame size, and hands each caller its own field. Several decode workers thus feed
    one model with batches instead of single pairs.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        max_batch: int,
        wait_s: float = 0.002,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        self._fn = fn
        self.max_batch = max_batch
        self._wait_s = wait_s
        self._jobs: queue.Queue[tuple[torch.Tensor, torch.Tensor, Future[torch.Tensor]]] = (
            queue.Queue()
        )
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0  # batches run so far (for tests and benchmarks)

    def __call__(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        fut: Future[torch.Tensor] = Future()
        self._jobs.put((prev, nxt, fut))
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="framepool-flow-batcher", daemon=True
                )
                self._thread.start()
        return fut.result()

    def _serve(self) -> None:
        while True:
            batch = [self._jobs.get()]
            deadline = time.monotonic() + self._wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._jobs.get(timeout=max(deadline - time.monotonic(), 1e-6)))
                except queue.Empty:
                    break
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (prev, _, _) in enumerate(batch):
                groups.setdefault(tuple(prev.shape), []).append(i)
            for idx in groups.values():
                futs = [batch[i][2] for i in idx]
                try:
                    out = self._fn(
                        torch.stack([batch[i][0] for i in idx]),
                        torch.stack([batch[i][1] for i in idx]),
                    )
                    self.batches += 1
                except BaseException as exc:
                    for f in futs:
                        f.set_exception(exc)
                    continue
                for f, field in zip(futs, out, strict=True):
                    f.set_result(field)


class RaftFlow:
    """torchvision RAFT on grayscale frames (replicated to 3 channels), weights from a file.

    Frames are scaled to [-1, 1] and padded (replicate) to a multiple of 8 and at least 128 (the
    model's smallest input); the flow is cropped back. ``dtype="bfloat16"`` runs the model under
    bfloat16 autocast (recorded in the config; float32 is the default and is not recorded).

    Batches: :meth:`flow_batch` computes many pairs at once; single pairs from any number of
    threads (:meth:`__call__`, :meth:`quantized_field`) are gathered into batches of up to
    ``max_batch`` pairs by one shared batcher, so clones (one per decode worker) share one model.
    :meth:`quantized_field` crops and quantises on the model's device; only uint8 leaves it.
    """

    name: ClassVar[str] = "raft"

    def __init__(
        self,
        weights: str | Path | None,
        *,
        device: str | torch.device = "cuda",
        num_flow_updates: int = 12,
        dtype: str = "float32",
        max_batch: int = 16,
        _shared: tuple[torch.nn.Module, str, str, threading.Lock, _PairBatcher] | None = None,
    ) -> None:
        if weights is None:
            raise ValueError(
                "--flow raft needs its weights as a local file: --flow-weights PATH (a torchvision "
                "raft_large/raft_small state dict, e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth); "
                "framepool never downloads weights"
            )
        if dtype not in RAFT_DTYPES:
            raise ValueError(f"RAFT dtype must be one of {list(RAFT_DTYPES)}, got {dtype!r}")
        self.weights = Path(weights).expanduser().resolve()
        self.device = torch.device(device)
        self.num_flow_updates = int(num_flow_updates)
        self.dtype = dtype
        if _shared is None:
            if not self.weights.is_file():
                raise FileNotFoundError(f"RAFT weights file {str(self.weights)!r} does not exist")
            model, arch = _load_raft(self.weights)
            model.eval().to(self.device)
            # the batcher calls this instance's flow_batch once __init__ has set it up
            _shared = (
                model,
                arch,
                sha256_file(self.weights),
                threading.Lock(),
                _PairBatcher(self.flow_batch, max_batch),
            )
        self._model, self.arch, self.sha256, self._lock, self._batcher = _shared

    @torch.inference_mode()
    def flow_batch(
        self, prev: np.ndarray | torch.Tensor, nxt: np.ndarray | torch.Tensor
    ) -> torch.Tensor:
        """Flow ``[N, H, W, 2]`` float32, on the model's device, for uint8 ``[N, H, W]`` pairs."""
        a, b = torch.as_tensor(prev), torch.as_tensor(nxt)
        if a.shape != b.shape or a.ndim != 3 or a.dtype != torch.uint8 or b.dtype != torch.uint8:
            raise ValueError(
                f"expected two uint8 batches of grayscale frames [N, H, W] of one size, got "
                f"{tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}"
            )
        n, h, w = a.shape
        pair = torch.cat([a, b]).to(self.device, non_blocking=True).float()  # [2N, H, W]
        pair = (pair / 127.5 - 1.0)[:, None].expand(2 * n, 3, h, w)  # [2N, 3, H, W]
        ph, pw = max(128 - h, (-h) % 8), max(128 - w, (-w) % 8)  # RAFT needs >= 128, /8
        if ph or pw:
            pair = F.pad(pair, (0, pw, 0, ph), mode="replicate")
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"
        )
        with self._lock, autocast:
            flows = self._model(
                pair[:n].contiguous(), pair[n:].contiguous(), num_flow_updates=self.num_flow_updates
            )
        return flows[-1][:, :, :h, :w].float().permute(0, 2, 3, 1)  # [N, H, W, 2]

    def _one(self, prev: np.ndarray, nxt: np.ndarray) -> torch.Tensor:
        _check_pair(prev, nxt)
        return self._batcher(torch.from_numpy(prev), torch.from_numpy(nxt))  # [H, W, 2]

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return self._one(prev, nxt).cpu().numpy()

    def quantized_field(
        self, prev: np.ndarray, nxt: np.ndarray, crop_box: tuple[int, int], size: int
    ) -> np.ndarray:
        """The ``size`` x ``size`` crop at ``crop_box`` of the flow, quantised: uint8 ``[s, s, 2]``.

        Equal to ``quantize_flow(self(prev, nxt)[crop])``, computed on the model's device.
        """
        top, left = crop_box
        field = self._one(prev, nxt)[top : top + size, left : left + size]
        return quantize_flow_batch(field).cpu().numpy()

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "backend": self.name,
            "model": self.arch,
            "weights_path": str(self.weights),
            "weights_sha256": self.sha256,
            "num_flow_updates": self.num_flow_updates,
            "input": "grayscale replicated to 3 channels, [-1, 1], replicate-padded to /8, >= 128",
        }
        if self.dtype != "float32":
            cfg["dtype"] = self.dtype
        return cfg

    def clone(self) -> RaftFlow:
        return RaftFlow(
            self.weights,
            device=self.device,
            num_flow_updates=self.num_flow_updates,
            dtype=self.dtype,
            _shared=(self._model, self.arch, self.sha256, self._lock, self._batcher),
        )


def make_flow(
    name: str,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    **params: Any,
) -> FlowBackend:
    """Build a flow backend by name (``dis``, ``farneback``, ``tvl1``, ``raft``).

    ``weights`` and ``device`` are for ``raft`` only; ``params`` are the backend's keyword options
    (e.g. ``preset="medium"`` for ``dis``).
    """
    if name != "raft" and weights is not None:
        raise ValueError(f"--flow-weights is only used by --flow raft, not by {name!r}")
    if name == "dis":
        return DisFlow(**params)
    if name == "farneback":
        return FarnebackFlow(**params)
    if name == "tvl1":
        if params:
            raise ValueError(f"tvl1 takes no parameters, got {sorted(params)}")
        return TvL1Flow()
    if name == "raft":
        return RaftFlow(weights, device=device, **params)
    raise ValueError(f"unknown flow backend {name!r}; choose from {list(FLOW_BACKENDS)}")


def flow_from_config(config: dict[str, Any], *, device: str | torch.device = "cpu") -> FlowBackend:
    """Rebuild the backend a store recorded, and check it reproduces the recorded config."""
    name = config.get("backend")
    if name == "dis":
        flow: FlowBackend = DisFlow(preset=str(config["preset"]))
    elif name == "farneback":
        keys = ("pyr_scale", "levels", "winsize", "iterations", "poly_n", "poly_sigma")
        flow = FarnebackFlow(**{k: config[k] for k in keys})
    elif name == "tvl1":
        flow = TvL1Flow()
    elif name == "raft":
        flow = RaftFlow(
            config["weights_path"],
            device=device,
            num_flow_updates=int(config["num_flow_updates"]),
            dtype=str(config.get("dtype", "float32")),
        )
        if flow.config()["weights_sha256"] != config["weights_sha256"]:
            raise ValueError(
                f"RAFT weights {config['weights_path']!r} changed since extraction: sha256 "
                f"{flow.config()['weights_sha256']} != recorded {config['weights_sha256']}"
            )
    else:
        raise ValueError(f"unknown flow backend {name!r} in recorded config {config}")
    rebuilt = flow.config()
    diff = {k for k in set(rebuilt) | set(config) if rebuilt.get(k) != config.get(k)}
    if diff:
        raise ValueError(
            f"flow backend {name!r} rebuilt with different parameters {sorted(diff)}: "
            f"recorded {config}, now {rebuilt}"
        )
    return flow
