"""RAFT over batches of frame pairs: batched equals one by one, bf16, quantisation on the device."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from extractor.flow import RaftFlow, flow_from_config, make_flow
from extractor.transforms import quantize_flow
from tests.extractor.test_flow import _shifted_pair


@pytest.fixture(scope="module")
def raft_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)
    return path


def _pairs(n: int, h: int = 60, w: int = 70) -> tuple[np.ndarray, np.ndarray]:
    pairs = [_shifted_pair(h, w, dx=1 + i % 3, dy=i % 2) for i in range(n)]
    return np.stack([p for p, _ in pairs]), np.stack([q for _, q in pairs])


def test_batch_equals_one_pair_at_a_time(raft_weights: Path) -> None:
    flow = RaftFlow(raft_weights, device="cpu", num_flow_updates=2)
    prev, nxt = _pairs(3)
    batch = flow.flow_batch(prev, nxt)
    assert batch.shape == (3, 60, 70, 2) and batch.dtype == torch.float32
    for i in range(3):
        np.testing.assert_allclose(batch[i].numpy(), flow(prev[i], nxt[i]), atol=1e-4)


def test_pairs_from_many_threads_are_batched(raft_weights: Path) -> None:
    flow = make_flow("raft", weights=raft_weights, device="cpu", num_flow_updates=2)
    assert isinstance(flow, RaftFlow)
    prev, nxt = _pairs(4)
    want = flow.flow_batch(prev, nxt).numpy()
    clones = [flow.clone() for _ in range(4)]  # one per decode worker, one shared model
    got: dict[int, np.ndarray] = {}
    start = threading.Barrier(4)

    def work(i: int) -> None:
        start.wait()
        got[i] = clones[i](prev[i], nxt[i])

    before = flow._batcher.batches
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_allclose(got[i], want[i], atol=1e-4)
    assert flow._batcher.batches - before < 4  # some pairs shared a batch


def test_mixed_sizes_in_one_wait_are_run_apart(raft_weights: Path) -> None:
    flow = RaftFlow(raft_weights, device="cpu", num_flow_updates=2)
    a = _shifted_pair(40, 48, dx=1, dy=0)
    b = _shifted_pair(56, 64, dx=2, dy=1)
    out: dict[str, np.ndarray] = {}
    ts = [
        threading.Thread(target=lambda: out.__setitem__("a", flow(*a))),
        threading.Thread(target=lambda: out.__setitem__("b", flow(*b))),
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out["a"].shape == (40, 48, 2) and out["b"].shape == (56, 64, 2)


def test_quantised_field_equals_cpu_quantisation(raft_weights: Path) -> None:
    flow = RaftFlow(raft_weights, device="cpu", num_flow_updates=2)
    prev, nxt = _shifted_pair(60, 70, dx=2, dy=1)
    f = flow(prev, nxt) * 30  # random weights give small flow: spread it over the codes
    flow_scaled = RaftFlow.__new__(RaftFlow)  # the same model, its output scaled by 30
    flow_scaled.__dict__.update(flow.__dict__)
    flow_scaled._one = lambda p, n: flow._one(p, n) * 30  # type: ignore[method-assign]
    q = flow_scaled.quantized_field(prev, nxt, (5, 7), 40)
    assert q.dtype == np.uint8 and q.shape == (40, 40, 2)
    np.testing.assert_array_equal(q, quantize_flow(f[5:45, 7:47]))
    assert len(np.unique(q)) > 20


def test_bfloat16_runs_and_is_recorded(raft_weights: Path) -> None:
    fp32 = RaftFlow(raft_weights, device="cpu", num_flow_updates=2)
    bf16 = RaftFlow(raft_weights, device="cpu", num_flow_updates=2, dtype="bfloat16")
    prev, nxt = _shifted_pair(60, 70, dx=2, dy=1)
    a, b = fp32(prev, nxt), bf16(prev, nxt)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert not np.array_equal(a, b)  # it did compute in bfloat16
    assert "dtype" not in fp32.config()
    cfg = bf16.config()
    assert cfg["dtype"] == "bfloat16"
    rebuilt = flow_from_config(cfg, device="cpu")
    assert isinstance(rebuilt, RaftFlow) and rebuilt.dtype == "bfloat16"
    assert rebuilt.clone().dtype == "bfloat16"
    with pytest.raises(ValueError, match="'float16'"):
        RaftFlow(raft_weights, device="cpu", dtype="float16")


def test_batch_refuses_bad_pairs(raft_weights: Path) -> None:
    flow = RaftFlow(raft_weights, device="cpu", num_flow_updates=2)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        flow.flow_batch(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 9), np.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_raft_on_gpu_matches_cpu(raft_weights: Path) -> None:
    prev, nxt = _pairs(8, 240, 320)
    cpu = RaftFlow(raft_weights, device="cpu", num_flow_updates=4).flow_batch(prev, nxt)
    gpu32 = RaftFlow(raft_weights, device="cuda", num_flow_updates=4)
    gpu = gpu32.flow_batch(prev, nxt).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-2, rtol=0)
    bf16 = RaftFlow(raft_weights, device="cuda", num_flow_updates=4, dtype="bfloat16")
    epe = (bf16.flow_batch(prev, nxt).cpu() - cpu).norm(dim=-1).mean()
    print(f"random-weight raft_small, bf16 vs fp32 mean end-point error: {float(epe):.4f} px")
    assert float(epe) < 0.5
    q = gpu32.quantized_field(prev[0], nxt[0], (8, 48), 224)
    one = gpu32(prev[0], nxt[0])  # the same batch of one pair: the same float flow
    np.testing.assert_array_equal(q, quantize_flow(one[8:232, 48:272]))
