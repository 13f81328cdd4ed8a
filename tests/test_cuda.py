"""Specifications of the CUDA path (skipped without a CUDA GPU; ``bench/gpu_check.sh`` runs
them on one): the sparse step's gradients on the GPU equal the CPU's, the batch copy through
pinned memory, fused Adam on CUDA, a bf16 training run, and 2-GPU NCCL data parallelism.

Tolerances: the GPU sums in another order than the CPU (and its GEMMs block differently), so
float32 results agree to rounding, ~1e-6 relative per sum; gradients are compared with
``rtol=1e-4, atol=1e-6``. TF32 is off for matmuls by default in torch (``allow_tf32`` False).
"""

from __future__ import annotations

import pytest
import torch

from saelab.optim import SAEAdam
from saelab.sae import build_sae
from saelab.tracking import NullTracker
from saelab.train import _next_batch, fvu, train_sae

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
HPARAMS = {"topk": {}, "batchtopk": {}, "switch": {"n_experts": 4, "balance_coef": 0.1},
           "sampled": {"l": 4, "score": "l2", "pool": "top"}}  # fmt: skip


def _x(batch: int = 256, d_in: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, d_in, generator=gen) + torch.randn(d_in, generator=gen)


def _grads(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.train().zero_grad(set_to_none=True)
    out = sae.forward_sparse(x)
    fvu(x, out.recon).backward()
    return {n: p.grad.detach().cpu() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", list(HPARAMS))
def test_sparse_step_gradients_on_cuda_equal_the_cpu(variant: str):
    """forward_sparse + FVU backward on the GPU: the CPU's reconstruction and gradients."""
    sae = build_sae(variant, 32, 128, 4, HPARAMS[variant], torch.Generator().manual_seed(0))
    x = _x()
    cpu_grads = _grads(sae, x)
    cpu_recon = sae.forward_sparse(x).recon.detach()
    gpu = sae.to(CUDA)
    gpu_grads = _grads(gpu, x.to(CUDA))
    torch.testing.assert_close(gpu.forward_sparse(x.to(CUDA)).recon.detach().cpu(), cpu_recon,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert gpu_grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_next_batch_copies_through_pinned_memory_to_the_gpu():
    """_next_batch to CUDA: the same float32 values on the device, from a pageable or a pinned
    host batch (the copy is non-blocking; reading the result waits for it)."""
    x = _x()
    for host in (x, x.pin_memory()):
        y = _next_batch(iter([host]), 0, 32, CUDA)
        assert y.device.type == "cuda" and y.dtype == torch.float32
        assert torch.equal(y.cpu(), x)


def test_fused_sae_adam_on_cuda_equals_the_cpu():
    """SAEAdam (fused) on a column-major W_enc on the GPU: the CPU's parameters after 3 steps
    with the same gradients."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 16, generator=gen)  # [16, 64] column-major once transposed
    grads = [torch.randn(16, 64, generator=gen) for _ in range(3)]
    results = []
    for device in (CPU, CUDA):
        param = torch.nn.Parameter(rows.to(device).t())
        assert not param.is_contiguous()
        optimizer = SAEAdam([param], lr=1e-2)
        for g in grads:
            param.grad = g.to(device)
            optimizer.step()
        results.append(param.detach().cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_a_bf16_training_run_on_cuda_learns():
    """train_sae on the GPU with train.autocast auto (bf16 on Ampere and later): FVU falls and
    the inference L0 of TopK is k."""
    from tests.test_train import make_cfg, synthetic_batches

    cfg = make_cfg(n_tokens=256 * 60, autocast="auto", device="cuda")
    sae = build_sae("topk", 32, 96, 4, {}, torch.Generator().manual_seed(0))
    summary = train_sae(sae, synthetic_batches(), cfg, NullTracker(), CUDA)
    assert summary["fvu"] < 0.5
    assert summary["inference_l0_train"] == pytest.approx(4.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_nccl_train_the_weights_of_one(tmp_path):
    """tests/test_distributed.py's equivalence, with NCCL on 2 GPUs for topk and batchtopk,
    within 10x its ATOL: CUDA's index_add_ and embedding_bag backward accumulate with atomics,
    so even one GPU is not bit-reproducible from run to run."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nccl_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    from tests.test_distributed import ATOL, _batches, _cfg, _max_diff, _sae

    for variant in ("topk", "batchtopk"):
        reference = _sae(variant)
        train_sae(reference, _batches(), _cfg(device="cuda"), NullTracker(), CUDA)
        state = torch.load(tmp_path / f"{variant}.pt")
        ref = {n: t.cpu() for n, t in reference.state_dict().items()}
        assert _max_diff(state, ref) <= 10 * ATOL


def _nccl_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from saelab import distributed
    from tests.test_distributed import _batches, _cfg, _sae, _slices

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, device_id=device)  # fmt: skip
    try:
        assert distributed.part_bounds(64, rank, 2)[1] > 0
        for variant in ("topk", "batchtopk"):
            sae = _sae(variant)
            batches = _batches()
            train_sae(sae, _slices(batches, rank), _cfg(device="cuda"), NullTracker(), device,
                      global_batches=batches)  # fmt: skip
            if rank == 0:
                torch.save({n: t.cpu() for n, t in sae.state_dict().items()},
                           f"{out}/{variant}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()
