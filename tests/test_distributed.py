"""Specification of data-parallel training: 2 gloo processes on CPU take the steps one process
takes on the whole batch, for every variant, a resume from a checkpoint included.

Tolerance. Two processes compute the same quantities with the batch sums split in two and
added (FVU's numerator and the batch variance, the gradients' sums over tokens, the feature
scores, the batch means), so they differ from one process only by fp32 rounding of those sums
(relative ~1e-7 per sum); the selections (TopK, BatchTopK's global θ, Sampled's pool, Switch's
routing) are discrete and come out the same unless two values are within that rounding of each
other. Measured over the 16 Adam steps of these runs: at most 1.2e-6 (sampled; 4.8e-7 to
9.5e-7 for the others), one or two ulps of weights of magnitude 1-5, so ``ATOL = 1e-5`` leaves
a factor ~10. A wrong rule moves weights by orders of magnitude more (measured by breaking the
code on purpose: per-rank dead counters, hence AuxK, 0.04 topk, 0.057 batchtopk, 0.21 sampled;
per-rank Switch f and counters 0.045; a per-rank BatchTopK selection fails batchtopk, sampled
and the selection test). The two ranks end bit-identical:
they apply the same all-reduced gradients to the same weights.
"""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelab import distributed
from saelab.config import TrainConfig
from saelab.sae import build_sae
from saelab.sae.activations import batch_topk, global_batch_topk
from saelab.store import ActivationWriter, ShuffledBatches
from saelab.tracking import NullTracker
from saelab.train import train_sae

CPU = torch.device("cpu")
WORLD = 2
STEPS = 16
BATCH = 64  # global batch; 32 tokens per rank
ATOL = 1e-5  # on weights of order 1-5 (a few fp32 ulps); module docstring
HPARAMS = {
    "topk": {},
    "batchtopk": {},
    "relu": {"l1_coef": 0.01, "init_b_enc": "quantile", "sparsity_warmup": 0.2},
    "jumprelu": {
        "bandwidth": 0.05,
        "l0_coef": 1.0,
        "init_threshold": None,
        "threshold_lr_scale": 10.0,
        "sparsity_warmup": 0.2,
    },  # fmt: skip
    # pool k*l = 8 of 48 latents: smaller than the firing set, so the draw matters
    "sampled": {"l": 2, "score": "entropy", "pool": "sample", "seed": 3},
    "switch": {"n_experts": 4, "balance_coef": 0.1},
}
INTERRUPT_AT = 7  # the resumed runs stop when step 7's batch is asked for


def _cfg(**overrides) -> TrainConfig:
    fields = dict(
        n_tokens=BATCH * STEPS, batch_size=BATCH, lr=5e-3, adam_beta1=0.9, adam_beta2=0.999,
        warmup_steps=2, lr_decay_fraction=0.25, grad_clip=1.0, threshold_fraction=0.5,
        scale_tokens=3 * BATCH // 2, dead_tokens=BATCH, k_aux=8, aux_coef=1 / 32,
        shuffle_chunks=1, log_every=4, checkpoint_every=0, seed=0, device="cpu",
        autocast="float32",
    )  # fmt: skip
    return TrainConfig(**(fields | overrides))


def _batches() -> list[torch.Tensor]:
    """The global stream: sparse codes of 24 features, 3 per token, on a 16-d offset dictionary
    (2 batches for the scale estimate, then one per step)."""
    gen = torch.Generator().manual_seed(7)
    dictionary = torch.nn.functional.normalize(torch.randn(24, 16, generator=gen), dim=1)
    out = []
    for _ in range(STEPS + 2):
        idx = torch.rand(BATCH, 24, generator=gen).argsort(dim=1)[:, :3]
        codes = torch.zeros(BATCH, 24).scatter_(1, idx, 0.5 + torch.rand(BATCH, 3, generator=gen))
        out.append((codes @ dictionary + 1.0) * 5.0)
    return out


def _sae(variant: str):
    return build_sae(variant, 16, 48, 4, HPARAMS[variant], torch.Generator().manual_seed(0))


def _slices(batches: list[torch.Tensor], rank: int, stop_at: int | None = None):
    for i, x in enumerate(batches):
        if stop_at is not None and i == stop_at + 1:  # the scale batch + steps before it
            raise KeyboardInterrupt
        lo, hi = distributed.part_bounds(len(x), rank, WORLD)
        yield x[lo:hi]


def _state(sae) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in sae.state_dict().items()}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    try:
        results = {"selection": _selection_case(rank)}
        batches = _batches()
        for variant in HPARAMS:
            sae = _sae(variant)
            summary = train_sae(sae, _slices(batches, rank), _cfg(), NullTracker(), CPU,
                                global_batches=batches)  # fmt: skip
            results[variant] = (_state(sae), summary)
            ckpt = Path(out) / f"ckpt-{variant}"
            cfg = _cfg(checkpoint_every=3)
            try:
                stopped = _slices(batches, rank, INTERRUPT_AT)
                train_sae(_sae(variant), stopped, cfg, NullTracker(), CPU, ckpt,
                          global_batches=batches)  # fmt: skip
            except KeyboardInterrupt:
                pass
            dist.barrier()  # rank 0 has written the checkpoint of the interrupt
            resumed = _sae(variant)
            train_sae(resumed, _slices(batches, rank), cfg, NullTracker(), CPU, ckpt,
                      global_batches=batches)  # fmt: skip
            results[f"{variant}-resumed"] = (_state(resumed), None)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _selection_case(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """global_batch_topk on this rank's rows of a batch with ties at the threshold: bf16
    values on a coarse grid (many equal entries)."""
    gen = torch.Generator().manual_seed(11)
    pre = (torch.randn(40, 24, generator=gen) * 4).round() / 4
    lo, hi = distributed.part_bounds(40, rank, WORLD)
    with distributed.data_parallel():
        rows, cols = global_batch_topk(pre[lo:hi], 3)
    return rows + lo, cols


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)}


@pytest.fixture(scope="module")
def one_process() -> dict[str, tuple[dict, dict]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batches = _batches()
    results = {}
    for variant in HPARAMS:
        sae = _sae(variant)
        summary = train_sae(sae, batches, _cfg(), NullTracker(), CPU)
        results[variant] = (_state(sae), summary)
    torch.set_num_threads(threads)
    return results


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("variant", list(HPARAMS))
def test_two_processes_train_the_weights_of_one(two_ranks, one_process, variant):
    """Weights, threshold and summary of 2 gloo ranks on 32-token slices equal one process on
    the 64-token batches within ATOL; both ranks hold the same bits."""
    state0, summary0 = two_ranks[0][variant]
    state1, _ = two_ranks[1][variant]
    reference, ref_summary = one_process[variant]
    assert _max_diff(state0, state1) == 0.0
    diff = _max_diff(state0, reference)
    print(f"{variant}: max |2 ranks - 1 process| = {diff:.3g}")
    assert diff <= ATOL, f"{variant}: max |2 ranks - 1 process| = {diff:.3g}"
    for key in ("fvu", "l0", "aux_loss", "sparsity_loss", "dead_fraction", "threshold",
                "inference_l0_train", "inference_fvu_train", "input_scale"):  # fmt: skip
        if key in ref_summary:
            assert summary0[key] == pytest.approx(ref_summary[key], rel=1e-4, abs=1e-6), key
    assert summary0["tokens"] == ref_summary["tokens"] == BATCH * STEPS
    if variant in ("topk", "batchtopk", "sampled"):  # dead latents: AuxK and the counters
        assert ref_summary["aux_loss"] > 0


@pytest.mark.parametrize("variant", list(HPARAMS))
def test_two_processes_resume_a_checkpoint_of_rank_0(two_ranks, one_process, variant):
    """Stopped by an interrupt at step 7 (rank 0 writes the checkpoint), resumed by both ranks:
    the weights of one uninterrupted process."""
    state0, _ = two_ranks[0][f"{variant}-resumed"]
    state1, _ = two_ranks[1][f"{variant}-resumed"]
    assert _max_diff(state0, state1) == 0.0
    diff = _max_diff(state0, one_process[variant][0])
    assert diff <= ATOL, f"{variant} resumed: max |2 ranks - 1 process| = {diff:.3g}"


def test_global_batch_topk_keeps_the_global_selection_with_ties(two_ranks):
    """Union of the ranks' selections = the one-process selection of the whole batch, as a set
    of kept values (ties among equal values may pick other entries), k * batch entries."""
    gen = torch.Generator().manual_seed(11)
    pre = (torch.randn(40, 24, generator=gen) * 4).round() / 4
    rows = torch.cat([two_ranks[r]["selection"][0] for r in range(WORLD)])
    cols = torch.cat([two_ranks[r]["selection"][1] for r in range(WORLD)])
    ref_rows, ref_cols = batch_topk(pre, 3 * 40)
    assert len(rows) == 3 * 40 == len(set(zip(rows.tolist(), cols.tolist(), strict=True)))
    got = pre[rows, cols].sort().values
    assert torch.equal(got, pre[ref_rows, ref_cols].sort().values)


def test_shuffled_batch_parts_make_up_the_whole_batch(tmp_path: Path):
    """ShuffledBatches(part=(i, 2)) yields disjoint slices whose concatenation, in rank order,
    is the batch of the whole stream, across groups and epochs (an odd batch size included)."""
    acts = torch.arange(300 * 2, dtype=torch.float32).view(300, 2)
    path = tmp_path / "a.zarr"
    with ActivationWriter(path, 300, 2, "float32", "none", 0, 64, {"ctx_len": 10}) as w:
        w.write(acts)
    kwargs = dict(exclude_first_position=True, shuffle_chunks=2, seed=3)
    whole = ShuffledBatches(path, 37, **kwargs)
    parts = [ShuffledBatches(path, 37, part=(i, 2), **kwargs) for i in range(2)]
    for _ in range(20):
        pieces = [next(p) for p in parts]
        assert [len(p) for p in pieces] == [18, 19]
        assert torch.equal(torch.cat(pieces), next(whole))
    with pytest.raises(ValueError, match="part"):
        ShuffledBatches(path, 37, part=(2, 2), **kwargs)


def test_helpers_are_identities_in_one_process():
    """Outside data_parallel (or with one rank) every helper returns its input: the
    single-process code path is unchanged."""
    t = torch.arange(6.0).view(3, 2)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.all_sum(t) is t and distributed.global_sum(t) is t
    assert torch.equal(distributed.global_mean(t), t.mean(dim=0))
    assert distributed.global_count(5, CPU) == 5
    assert distributed.part_bounds(37, 0, 2) == (0, 18)
    assert list(itertools.chain(*(range(*distributed.part_bounds(37, i, 3)) for i in range(3)))) \
        == list(range(37))  # fmt: skip
    assert np.isclose(float(distributed.all_min(torch.tensor(2.0))), 2.0)


@pytest.mark.slow  # two `saelab train` commands with MLflow, one under torchrun: ~40 s
def test_saelab_train_in_two_processes_saves_the_sae_of_one(tmp_path: Path, make_tiny_params):
    """`saelab train` with distributed.nproc_per_node = 2 starts itself under torchrun (2 gloo
    processes reading their slices of the zarr store); rank 0 saves the SAE of the
    one-process command, within ATOL, with the same training summary up to rounding."""
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(5)
    dictionary = torch.nn.functional.normalize(torch.randn(24, 16, generator=gen), dim=1)
    idx = torch.rand(2048, 24, generator=gen).argsort(dim=1)[:, :3]
    codes = torch.zeros(2048, 24).scatter_(1, idx, 0.5 + torch.rand(2048, 3, generator=gen))
    acts = tmp_path / "acts"
    attrs = {"ctx_len": 32}
    with ActivationWriter(acts / "train", 2048, 16, "float32", "none", 0, 512, attrs) as w:
        w.write((codes @ dictionary + 1.0) * 5.0)
    (tmp_path / "corpus").mkdir()  # train reads no corpus, but params must name one
    params = make_tiny_params(tmp_path, [str(tmp_path / "corpus")], f"sqlite:///{tmp_path}/db")
    params["k"] = 4
    params["sae"].update(d_sae=48)
    params["train"].update(n_tokens=64 * 12, batch_size=64, scale_tokens=128, dead_tokens=64,
                           k_aux=8, checkpoint_every=0, device="cpu",
                           autocast="float32")  # fmt: skip
    outs = {}
    for n in (1, 2):
        params["distributed"]["nproc_per_node"] = n
        path = tmp_path / f"params{n}.yaml"
        path.write_text(yaml.safe_dump(params))
        outs[n] = tmp_path / f"sae{n}"
        command = [sys.executable, "-m", "saelab.cli", "train", "--params", str(path),
                   "--variant", "batchtopk", "--activations", str(acts),
                   "--out", str(outs[n])]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(outs[n] / "sae.safetensors")) for n in (1, 2))
    assert _max_diff(one, two) <= ATOL
    summaries = [yaml.safe_load((outs[n] / "cfg.json").read_text()) for n in (1, 2)]
    s1, s2 = (s["metadata"]["train_summary"] for s in summaries)
    assert s2["tokens"] == s1["tokens"] == 64 * 12
    assert s2["fvu"] == pytest.approx(s1["fvu"], rel=1e-4)
    assert s2["threshold"] == pytest.approx(s1["threshold"], rel=1e-4)


def test_relaunch_runs_the_launcher_with_the_process_count(monkeypatch):
    """relaunch appends --nproc-per-node N and the arguments to the launcher, returns its exit
    status, and runs a leading `torchrun` as this interpreter's torch.distributed.run."""
    import shlex
    import subprocess
    import sys

    count_args = f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(len(sys.argv))'"
    assert distributed.relaunch(count_args, 2, ["a", "b"]) == 4  # -c, --nproc-per-node=2, a, b
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: seen.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))  # fmt: skip
    assert distributed.relaunch("torchrun --standalone", 3, ["-m", "saelab.cli"]) == 0
    assert seen == [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node=3", "-m", "saelab.cli"]]  # fmt: skip
