"""Specification of the sharded cache (issue 14, part 2): N gloo processes write the activation
stores of one process, chunk file for chunk file.

Equality is byte equality: every chunk file of 2 ranks has the bytes of the 1-process file, and
``zarr.json`` has the 1-process text once the ``tokens_per_s`` value (a timing) is blanked out
(so the attributes, their order, the codecs and the chunk grid are the same). Both sides run one
thread per process, so their forward passes compute the same floats (the batches are the same
contexts in the same shapes, :func:`saelab.cache.batch_starts`).

The tiny Llama of conftest, ctx_len 32, chunk_tokens 1024 (32 contexts), batch_size 3: batches
straddle chunks and ranks. Train: 130 contexts, 5 chunks (4 whole, 64 rows): ranks of 2 and 3
chunks. Eval: 48 contexts, 2 chunks (1024 + 512 rows). A second run of 1 chunk per split leaves
rank 1 idle (more ranks than chunks: allowed, it only waits).

Checked by breaking the code on purpose: rank 0 recording its own part's row count as
``n_tokens`` (a rank-local attribute) fails both byte tests at ``zarr.json``; batches starting at
a part's first context instead of on the one-process grid fail 4 cases of the parts test, while
the stores stayed byte-equal on this CPU (a row's floats here do not depend on its batch), so
that rule is held by the parts test, not by the bytes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from saelab import distributed
from saelab.cache import batch_starts, cache_activations
from saelab.capture import load_model
from saelab.config import parse_params
from saelab.data import write_tokens
from saelab.store import (
    ActivationStore,
    ActivationWriter,
    StorePartWriter,
    chunk_part,
    create_shared_store,
    finish_shared_store,
    store_attrs,
)

TESTS = Path(__file__).resolve().parent
CPU = torch.device("cpu")
WORLD = 2
CTX_LEN, CHUNK, BATCH = 32, 1024, 3
N_TRAIN, N_EVAL = 130, 48  # contexts
SIZES = {"uneven": (N_TRAIN * CTX_LEN, None), "one_chunk": (20 * CTX_LEN, 1024)}  # max tokens
TOKENS = {"uneven": {"train": 4160, "eval": 1536}, "one_chunk": {"train": 640, "eval": 1024}}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama_dir, make_tiny_params) -> Path:
    """A token group of random contexts (train 130, eval 48) and the params of each size."""
    root = tmp_path_factory.mktemp("sharded-cache")
    gen = np.random.default_rng(0)
    splits = {"train": gen.integers(0, 49152, (N_TRAIN, CTX_LEN), dtype=np.int32),
              "eval": gen.integers(0, 49152, (N_EVAL, CTX_LEN), dtype=np.int32)}  # fmt: skip
    write_tokens(root / "tokens", splits, {})
    (root / "corpus").mkdir()  # the cache reads no corpus, but params must name one
    for name, (max_train, max_eval) in SIZES.items():
        params = make_tiny_params(tiny_llama_dir, [str(root / "corpus")], None)
        params["cache"].update(max_train_tokens=max_train, max_eval_tokens=max_eval,
                               batch_size=BATCH, chunk_tokens=CHUNK)  # fmt: skip
        (root / f"{name}.yaml").write_text(yaml.safe_dump(params))
    return root


def _cache(root: Path, name: str, out: Path, hookpoints_out: Path | None = None) -> None:
    cfg = parse_params(yaml.safe_load((root / f"{name}.yaml").read_text()))
    model = load_model(cfg.model, CPU)
    cache_activations(model, cfg, str(root / "tokens"), out, hookpoints_out)


def _worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    try:
        with distributed.data_parallel():
            for name in SIZES:  # with the cache stage's --hookpoints-out (no extra hookpoints)
                _cache(Path(root), name, Path(root) / f"{name}-2", Path(root) / f"{name}-2-hp")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def stores(work: Path) -> Path:
    """``<name>-1``: one process; ``<name>-2``: two gloo processes; for each size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in SIZES:
            _cache(work, name, work / f"{name}-1")
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(work)), nprocs=WORLD, join=True)
    return work


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _zarr_json(path: Path) -> str:
    """``zarr.json`` with the value of ``tokens_per_s`` (a timing) blanked out."""
    text = path.read_text()
    assert len(re.findall(r'"tokens_per_s": [0-9.e+-]+', text)) == 1, text
    return re.sub(r'"tokens_per_s": [0-9.e+-]+', '"tokens_per_s": T', text)


def assert_same_stores(one: Path, two: Path) -> None:
    """``one`` and ``two`` (cache outputs) hold the same files with the same bytes (``zarr.json``
    up to the tokens_per_s value)."""
    assert _files(one) == _files(two)
    assert {p.parts[0] for p in _files(one)} == {"train", "eval"}
    for rel in _files(one):
        if rel.name == "zarr.json":
            assert _zarr_json(one / rel) == _zarr_json(two / rel), rel
        else:
            assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel


def _debris(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("name", list(SIZES))
def test_two_processes_write_the_bytes_of_one(stores: Path, name: str) -> None:
    """Train and eval stores of 2 gloo ranks = the 1-process stores, byte for byte: uneven
    chunk counts (2 and 3 chunks, a partial last chunk, batches straddling the ranks' rows), and
    a split of one chunk (rank 1 idle). The directory of the extra hookpoints' stores, given,
    is empty (none in params). No temporary directory is left."""
    one, two = stores / f"{name}-1", stores / f"{name}-2"
    assert_same_stores(one, two)
    assert (stores / f"{name}-2-hp").is_dir() and not any((stores / f"{name}-2-hp").iterdir())
    for split, n_tokens in TOKENS[name].items():
        store = ActivationStore(two / split)
        assert store.n_tokens == store.attrs["n_tokens"] == n_tokens
        assert store.attrs["tokens_per_s"] > 0
        assert torch.equal(store.read(0, store.n_tokens), ActivationStore(one / split).read(
            0, store.n_tokens))  # fmt: skip
    assert ActivationStore(two / "train").n_chunks == (5 if name == "uneven" else 1)
    assert _debris(stores) == []


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n_ctx,batch", [(130, 3), (128, 16), (7, 4), (33, 1)])
def test_parts_cover_every_row_once_with_the_one_process_batches(world, n_ctx, batch):
    """chunk_part splits the rows into consecutive runs of whole chunks (counts differing by at
    most one, the last partial chunk in the last part; empty parts when chunks < ranks), and
    batch_starts gives the one-process batches (multiples of batch) holding a part's rows, each
    holding at least one of them."""
    n_tokens = n_ctx * CTX_LEN
    parts = [chunk_part(n_tokens, CHUNK, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n_tokens
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
    chunk = min(CHUNK, n_tokens)
    n_chunks = [-(-(hi - lo) // chunk) for lo, hi in parts]
    assert sum(n_chunks) == -(-n_tokens // chunk) and max(n_chunks) - min(n_chunks) <= 1
    assert all(lo % chunk == 0 for lo, _ in parts)
    for lo, hi in parts:
        starts = list(batch_starts(lo, hi, CTX_LEN, batch))
        assert all(i % batch == 0 and i < n_ctx for i in starts)
        covered = {
            row for i in starts for row in range(i * CTX_LEN, min(i + batch, n_ctx) * CTX_LEN)
        }
        assert set(range(lo, hi)) <= covered
        assert all(
            max(lo, i * CTX_LEN) < min(hi, (i + batch) * CTX_LEN) for i in starts
        )  # every batch holds a row of the part


def _run(root: Path, params: str, kill: tuple | None, n: int, out: str = "acts"):
    """``saelab cache`` in ``n`` processes under torchrun (``n == 1``: one plain process),
    through tests/kill_at.py: ``kill = (rank, function, nth, before/after)`` SIGKILLs that rank
    at that point."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    target = ["-"]
    if kill is not None:
        env["KILL_RANK"] = str(kill[0])
        target = [kill[1], str(kill[2]), kill[3]]
    launcher = [sys.executable]
    if n > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    command = [*launcher, str(TESTS / "kill_at.py"), *target, "--", "cache", "--params", params,
               "--tokens", "tokens", "--out", out]  # fmt: skip
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.slow  # six launches of `saelab cache`, five of 2 processes: 12-17 min under load
def test_cache_command_killed_rank_leaves_nothing_and_rerun_gives_the_store(stores: Path):
    """`saelab cache` with distributed.cache_nproc_per_node = 2 (relaunching itself under
    torchrun) writes the stores of the 1-process command. Rank 1 SIGKILLed before its second
    chunk, or rank 0 SIGKILLed with both splits written, before moving them into place: the
    command fails and ``acts`` does not exist (nothing a re-run, or DVC, could take for the
    output); the re-run writes the 1-process stores and leaves no temporary directory behind."""
    reference = _run(stores, "uneven.yaml", None, 1, out="ref")
    assert reference.returncode == 0, reference.stderr[-3000:]
    params = yaml.safe_load((stores / "uneven.yaml").read_text())
    params["distributed"]["cache_nproc_per_node"] = 2
    (stores / "two.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    plain = [sys.executable, "-m", "saelab.cli", "cache", "--params", "two.yaml", "--tokens",
             "tokens", "--out", "acts"]  # fmt: skip
    done = subprocess.run(plain, cwd=stores, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_stores(stores / "ref", stores / "acts")
    kills = [(1, "saelab.store:StorePartWriter._flush", 2, "before"),
             (0, "saelab.store:_commit", 1, "before")]  # fmt: skip
    for kill in kills:
        subprocess.run(["rm", "-r", str(stores / "acts")], check=True)
        killed = _run(stores, "uneven.yaml", kill, WORLD)
        assert killed.returncode != 0, (kill, killed.stderr[-3000:])
        assert f"exitcode  : {-signal.SIGKILL}" in killed.stderr, killed.stderr[-3000:]
        assert not (stores / "acts").exists(), kill
        if kill[0] == 0:  # killed: no clean-up; the next run's sweep removes it
            assert [p.name for p in stores.glob("acts.tmp-*")], killed.stderr[-3000:]
        again = _run(stores, "uneven.yaml", None, WORLD)
        assert again.returncode == 0, again.stderr[-3000:]
        assert _debris(stores) == [], kill
        assert_same_stores(stores / "ref", stores / "acts")


def test_part_writers_write_the_bytes_of_one_writer(tmp_path: Path) -> None:
    """Three StorePartWriters on the chunk_part runs of a shared store (bf16, blosc, a partial
    last chunk), fed in odd-sized writes, then finish_shared_store: the chunk files and
    zarr.json of one ActivationWriter. A run that is not whole chunks is refused."""
    n, d_in, chunk = 700, 3, 128
    acts = torch.randn(n, d_in, generator=torch.Generator().manual_seed(0))
    args = (n, d_in, "bfloat16", "blosc_zstd", 3, chunk)
    with ActivationWriter(tmp_path / "one", *args, {"ctx_len": 10}) as writer:
        writer.write(acts)
    (tmp_path / "two").mkdir()
    create_shared_store(tmp_path / "two" / "s", *args)
    for part in range(3):
        lo, hi = chunk_part(n, chunk, part, 3)
        with StorePartWriter(tmp_path / "two" / "s", "bfloat16", lo, hi) as w:
            for start in range(lo, hi, 77):
                w.write(acts[start : min(start + 77, hi)])
    finish_shared_store(tmp_path / "two" / "s", store_attrs({"ctx_len": 10}, "bfloat16", n, d_in))
    one, two = tmp_path / "one", tmp_path / "two" / "s"
    assert _files(one) == _files(two) and len(_files(one)) == 7  # zarr.json + 6 chunks
    for rel in _files(one):
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    with pytest.raises(ValueError, match="not whole chunks"):
        StorePartWriter(two, "bfloat16", 100, 256)
    with pytest.raises(ValueError, match="rows written"), StorePartWriter(two, "bfloat16", 0, 128):
        pass
