"""Specifications of saelab.store: atomic outputs, codecs, writer, reader, batch iterators."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from saelab.store import (
    ActivationStore,
    ActivationWriter,
    ShuffledBatches,
    atomic_dir,
    decode_block,
    encode_block,
    iter_batches,
    make_compressors,
    remove_stale_siblings,
)

DTYPES = ("float32", "float16", "bfloat16")
CODECS = ("zstd", "blosc_zstd", "blosc_lz4", "none")


def write_store(
    path: Path,
    acts: torch.Tensor,
    *,
    ctx_len: int,
    chunk_tokens: int,
    dtype: str = "float32",
    codec: str = "zstd",
    pieces: int = 3,
) -> None:
    """Write ``acts`` through ActivationWriter in ``pieces`` uneven slices."""
    n, d_in = acts.shape
    with ActivationWriter(path, n, d_in, dtype, codec, 3, chunk_tokens, {"ctx_len": ctx_len}) as w:
        bounds = np.linspace(0, n, pieces + 1).astype(int)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            w.write(acts[a:b])


def row_index_acts(n: int, d_in: int = 3) -> torch.Tensor:
    """``[n, d_in] float32`` whose row r is all r: a batch row names the token it came from."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, d_in).contiguous()


# --------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_replaces_on_success(tmp_path: Path) -> None:
    """On success the old directory is gone, the new content is at path, no sibling is left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp != out and tmp.is_dir() and list(tmp.iterdir()) == []
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # untouched until the block succeeds
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_leaves_nothing_on_exception(tmp_path: Path) -> None:
    """On an exception the temp dir is removed, path is as before, the exception propagates."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "fresh"):
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------- codecs and dtypes


def test_make_compressors() -> None:
    """Codec names map to zarr v3 codecs; Blosc gets byte shuffle and the dtype's item size."""
    assert make_compressors("none", 3) == ()
    (zstd,) = make_compressors("zstd", 7)
    assert isinstance(zstd, ZstdCodec) and zstd.level == 7
    (blosc,) = make_compressors("blosc_lz4", 3, np.uint16)
    assert isinstance(blosc, BloscCodec)
    assert (blosc.cname.value, blosc.clevel, blosc.shuffle.value, blosc.typesize) == (
        "lz4",
        3,
        "shuffle",
        2,
    )
    with pytest.raises(ValueError, match="unknown codec"):
        make_compressors("gzip", 3)
    with pytest.raises(ValueError, match="blosc level"):
        make_compressors("blosc_zstd", 12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_decode_block_matches_torch_rounding(dtype: str) -> None:
    """decode(encode(x)) == x.to(dtype).float() bit for bit; bf16 is stored as uint16 bits."""
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 100
    block = encode_block(x, dtype)
    expected = x.to(getattr(torch, dtype)).float()
    assert torch.equal(decode_block(block, dtype), expected)
    if dtype == "bfloat16":
        assert block.dtype == np.uint16
        bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(block, bits)
    with pytest.raises(ValueError, match="holds"):
        decode_block(block.astype(np.float64), dtype)


# --------------------------------------------------------------------------- writer


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_writer_round_trip(tmp_path: Path, dtype: str, codec: str) -> None:
    """Every dtype x codec: the store reads back exactly x.to(dtype).float(), with its attrs."""
    acts = torch.randn(120, 8, generator=torch.Generator().manual_seed(1)) * 30
    path = tmp_path / "acts.zarr"
    write_store(
        path,
        acts.to(torch.bfloat16),
        ctx_len=10,
        chunk_tokens=32,
        dtype=dtype,
        codec=codec,
        pieces=5,
    )
    store = ActivationStore(path)
    assert (store.n_tokens, store.d_in, store.ctx_len, store.chunk_tokens) == (120, 8, 10, 32)
    assert store.attrs["dtype"] == dtype
    expected = acts.to(torch.bfloat16).to(getattr(torch, dtype)).float()
    got = store.read(0, 120)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(store.read(30, 70), expected[30:70])
    assert [p.name for p in tmp_path.iterdir()] == ["acts.zarr"]


def test_writer_writes_whole_chunks(tmp_path: Path) -> None:
    """Whatever the write sizes, each zarr write covers exactly one chunk (last may be partial)."""
    n, d_in, chunk = 300, 4, 64
    writes: list[tuple[int, int]] = []
    writer = ActivationWriter(
        tmp_path / "a.zarr", n, d_in, "float32", "none", 0, chunk, {"ctx_len": 10}
    )
    array = writer._array

    class Recorder:
        def __setitem__(self, key: slice, value: np.ndarray) -> None:
            writes.append((key.start, key.stop))
            array[key] = value

        def __getattr__(self, name: str) -> object:
            return getattr(array, name)

    writer._array = Recorder()
    for size in (7, 50, 100, 143):
        writer.write(torch.ones(size, d_in))
    writer.close({"note": "x"})
    assert writes == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 300)]
    assert len(list((tmp_path / "a.zarr" / "c").iterdir())) == 5  # chunk files, dim 0
    assert ActivationStore(tmp_path / "a.zarr").attrs["note"] == "x"


def test_writer_rejects_wrong_counts(tmp_path: Path) -> None:
    """Too many rows fail at write; too few fail at close; neither leaves a store behind."""
    path = tmp_path / "a.zarr"
    args = (path, 20, 2, "float32", "none", 0, 8, {"ctx_len": 10})
    w = ActivationWriter(*args)
    with pytest.raises(ValueError, match="exceed"):
        w.write(torch.zeros(21, 2))
    w.write(torch.zeros(10, 2))
    with pytest.raises(ValueError, match="10 rows written"):
        w.close()
    with pytest.raises(ValueError, match="activations"), ActivationWriter(*args) as w2:
        w2.write(torch.zeros(4, 3))
    assert list(tmp_path.iterdir()) == []


def test_writer_validates_attrs(tmp_path: Path) -> None:
    """Bad attrs (no ctx_len, ctx_len not dividing n_tokens, own keys) or codec: no output."""
    base = (tmp_path / "a.zarr", 20, 2, "float32", "none", 0, 8)
    with pytest.raises(ValueError, match="ctx_len"):
        ActivationWriter(*base, {})
    with pytest.raises(ValueError, match="multiple"):
        ActivationWriter(*base, {"ctx_len": 3})
    with pytest.raises(ValueError, match="itself"):
        ActivationWriter(*base, {"ctx_len": 10, "dtype": "float32"})
    with pytest.raises(ValueError, match="blosc level"):
        ActivationWriter(tmp_path / "a.zarr", 20, 2, "float32", "blosc_lz4", 12, 8, {"ctx_len": 10})
    assert list(tmp_path.iterdir()) == []


def test_store_requires_attrs(tmp_path: Path) -> None:
    """A zarr array without the writer's attributes is rejected, naming what is missing."""
    zarr.create_array(store=str(tmp_path / "raw"), shape=(4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="ctx_len"):
        ActivationStore(tmp_path / "raw")


# --------------------------------------------------------------------------- batch iterators

N_CTX, CTX_LEN, CHUNK = 16, 8, 32  # 128 rows, 4 chunks, 112 rows off position 0
NOT_POS0 = [r for r in range(N_CTX * CTX_LEN) if r % CTX_LEN]


@pytest.fixture(params=DTYPES)
def index_store(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A store whose row r is all r (exact in every dtype: r < 256), in each store dtype."""
    path = tmp_path / "index.zarr"
    acts = row_index_acts(N_CTX * CTX_LEN)
    write_store(path, acts, ctx_len=CTX_LEN, chunk_tokens=CHUNK, dtype=request.param)
    return path


def rows_of(batch: torch.Tensor) -> list[int]:
    assert torch.equal(batch, batch[:, :1].expand_as(batch))  # rows stay whole
    return batch[:, 0].long().tolist()


def take(batches: ShuffledBatches, n: int) -> list[torch.Tensor]:
    return [next(batches) for _ in range(n)]


def test_shuffled_batches_each_token_once_per_epoch(index_store: Path) -> None:
    """112 usable rows, batch 16: batches 0-6 and 7-13 each hold every non-pos-0 row once."""
    batches = ShuffledBatches(
        index_store, 16, exclude_first_position=True, shuffle_chunks=2, seed=0
    )
    assert batches.tokens_per_epoch == 112
    got = take(batches, 14)
    assert all(b.shape == (16, 3) and b.dtype == torch.float32 for b in got)
    epoch1 = [r for b in got[:7] for r in rows_of(b)]
    epoch2 = [r for b in got[7:] for r in rows_of(b)]
    assert sorted(epoch1) == NOT_POS0 and sorted(epoch2) == NOT_POS0
    assert epoch1 != epoch2  # epochs are shuffled differently
    assert epoch1 != sorted(epoch1)  # token-level shuffle, not sequential


def test_shuffled_batches_carry_remainder(index_store: Path) -> None:
    """Batch 10 does not divide 112: 110 distinct rows first; over 33 batches each row 2-3x."""
    batches = ShuffledBatches(
        index_store, 10, exclude_first_position=True, shuffle_chunks=2, seed=1
    )
    rows = [r for b in take(batches, 33) for r in rows_of(b)]
    assert len(set(rows[:110])) == 110
    counts = Counter(rows)
    assert set(counts) == set(NOT_POS0) and set(counts.values()) <= {2, 3}


def test_shuffled_batches_keeps_pos0_when_asked(index_store: Path) -> None:
    """exclude_first_position=False: 8 batches of 16 hold all 128 rows once."""
    batches = ShuffledBatches(
        index_store, 16, exclude_first_position=False, shuffle_chunks=3, seed=0
    )
    rows = [r for b in take(batches, 8) for r in rows_of(b)]
    assert sorted(rows) == list(range(128))


def test_shuffled_batches_reproducible(index_store: Path) -> None:
    """Same seed -> identical stream; another seed -> another stream."""

    def stream(seed: int) -> list[torch.Tensor]:
        return take(
            ShuffledBatches(
                index_store, 16, exclude_first_position=True, shuffle_chunks=1, seed=seed
            ),
            10,
        )

    a, b, c = stream(7), stream(7), stream(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def reference_stream(
    path: Path, batch: int, shuffle_chunks: int, seed: int, exclude: bool
) -> Iterator[torch.Tensor]:
    """The straightforward reading of ShuffledBatches' spec: the whole store in memory, global
    row indices, the same generator draws (chunk order per epoch, one permutation per group of
    carry + chunks)."""
    store = ActivationStore(path)
    data = store.read(0, store.n_tokens)
    gen = torch.Generator().manual_seed(seed)
    carry = torch.empty(0, dtype=torch.long)
    while True:
        order = torch.randperm(store.n_chunks, generator=gen).tolist()
        for g in range(0, len(order), shuffle_chunks):
            rows = [carry]
            for c in order[g : g + shuffle_chunks]:
                start, stop = store.chunk_range(c)
                keep = store.keep_mask(start, stop) if exclude else slice(None)
                rows.append(torch.arange(start, stop)[keep])
            rows = torch.cat(rows)
            rows = rows[torch.randperm(len(rows), generator=gen)]
            n_full = len(rows) // batch
            for b in range(n_full):
                yield data[rows[b * batch : (b + 1) * batch]]
            carry = rows[n_full * batch :]


@pytest.mark.parametrize(("batch", "shuffle_chunks", "exclude"), [(16, 2, True), (10, 3, False)])
def test_shuffled_batches_match_reference(
    index_store: Path, batch: int, shuffle_chunks: int, exclude: bool
) -> None:
    """The chunk-group reader yields exactly the reference stream's batches (3 epochs)."""
    got = ShuffledBatches(
        index_store, batch, exclude_first_position=exclude, shuffle_chunks=shuffle_chunks, seed=3
    )
    want = reference_stream(index_store, batch, shuffle_chunks, 3, exclude)
    for _ in range(3 * 128 // batch):
        assert torch.equal(next(got), next(want))


def test_shuffled_batches_release_previous_group(index_store: Path) -> None:
    """Peak memory is one group: when a group is loaded, the previous group's buffer is gone."""
    batches = ShuffledBatches(
        index_store, 16, exclude_first_position=True, shuffle_chunks=2, seed=0
    )
    loaded: list[weakref.ref] = []
    alive_at_load: list[bool] = []
    load = batches._load

    def spy(chunks: list[int], carry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alive_at_load.append(any(ref() is not None for ref in loaded))
        buffer, rows = load(chunks, carry)
        loaded.append(weakref.ref(buffer))
        return buffer, rows

    batches._load = spy  # type: ignore[method-assign]
    take(batches, 14)  # two epochs of two groups each
    assert len(alive_at_load) >= 4 and not any(alive_at_load)


@pytest.mark.parametrize("exclude", [True, False])
def test_iter_batches_sequential(index_store: Path, exclude: bool) -> None:
    """One pass in row order, pos 0 dropped when asked; full batches then one partial."""
    batches = list(iter_batches(index_store, 50, exclude_first_position=exclude))
    expected = NOT_POS0 if exclude else list(range(128))
    assert [len(b) for b in batches] == [50, 50, len(expected) - 100]
    assert [r for b in batches for r in rows_of(b)] == expected


def test_atomic_dir_removes_what_killed_processes_left(tmp_path: Path) -> None:
    """A process killed with SIGKILL leaves ``<out>.tmp-<pid>`` (and maybe ``<out>.old-<pid>``):
    the next atomic_dir(out) removes those of dead processes, keeps a live process's one and
    anything not of that form, and commits as usual."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    out = tmp_path / "out"
    stale = [tmp_path / f"out.tmp-{dead_pid}", tmp_path / f"out.old-{dead_pid}"]
    kept = [
        tmp_path / f"out.tmp-{live_pid}",
        tmp_path / "out.tmp-x1",
        tmp_path / f"outs.tmp-{dead_pid}",
    ]
    for path in stale + kept:
        path.mkdir()
        (path / "partial").write_text("half")
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("ok")
    assert sorted(tmp_path.iterdir()) == sorted([out, *kept])
    assert (out / "done").read_text() == "ok"
    assert remove_stale_siblings(out) == []
