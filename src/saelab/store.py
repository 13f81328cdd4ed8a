"""Zarr v3 activation store: an atomic writer, a token-shuffling batch reader, a sequential one.

An activation store is one zarr v3 array ``[n_tokens, d_in]`` chunked ``(chunk_tokens, d_in)``
(not sharded), whose rows are the tokens of consecutive ``ctx_len``-token contexts, so row ``r``
sits at position ``r % ctx_len`` of its context. Its attributes hold at least ``dtype`` (the
logical dtype), ``n_tokens``, ``d_in`` and ``ctx_len``. zarr 3 has no bfloat16: a ``bfloat16``
store holds the uint16 bit patterns; :func:`decode_block` turns a block back into float32.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from saelab import distributed
from saelab.config import InputError
from saelab.distributed import part_bounds

logger = logging.getLogger(__name__)

# logical dtype -> (numpy dtype stored in zarr, torch dtype whose bits are stored)
STORE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
}
REQUIRED_ATTRS = ("dtype", "n_tokens", "d_in", "ctx_len")
BLOSC_MAX_LEVEL = 9


# --------------------------------------------------------------------------- atomic outputs


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_siblings(path: Path) -> list[Path]:
    """Remove the temporary siblings ``<path>.tmp-<pid>`` and ``<path>.old-<pid>`` left by a
    process that no longer runs (killed with SIGKILL, or by the OOM killer, before it could
    clean up); those of a live process are kept. Returns the paths removed."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for sibling in path.parent.glob(f"{glob.escape(path.name)}.*-*"):
        kind, _, pid = sibling.name[len(path.name) + 1 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
            _remove(sibling)
            removed.append(sibling)
            logger.info("removed %s, left by a process that was killed", sibling)
    return removed


def _begin(path: Path) -> Path:
    """Create an empty temporary sibling of ``path`` and return it; this process's stale one
    and those of dead processes (:func:`remove_stale_siblings`) are removed first."""
    tmp = _temp_sibling(path)
    remove_stale_siblings(path)
    _remove(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an existing ``path`` is moved aside first, then removed."""
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists() or path.is_symlink():
        _remove(old)
        path.rename(old)
    tmp.rename(path)
    if old.exists() or old.is_symlink():
        _remove(old)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and move it to ``path`` only on success.

    Yields an empty directory ``<path>.tmp-<pid>``. When the block exits normally, an existing
    ``path`` (file or directory) is removed and the temporary directory renamed to ``path``;
    when it raises (including KeyboardInterrupt), the temporary directory is removed and the
    exception propagates, leaving ``path`` as it was. A process killed with SIGKILL cannot
    clean up: its ``<path>.tmp-<pid>`` is removed by the next ``atomic_dir(path)`` (or
    :class:`ActivationWriter`) of any process (:func:`remove_stale_siblings`).
    """
    path = Path(path)
    tmp = _begin(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _commit(tmp, path)


# --------------------------------------------------------------------------- codecs and dtypes


def make_compressors(
    codec: str, level: int, dtype: np.dtype | str | None = None
) -> tuple[Any, ...]:
    """zarr v3 compressors (bytes-to-bytes codecs) for a codec name from ``config.CODECS``.

    Args:
        codec: ``zstd`` (ZstdCodec), ``blosc_zstd`` / ``blosc_lz4`` (BloscCodec, byte shuffle)
            or ``none``.
        level: compression level: 0-22 for zstd, 0-9 for blosc; ignored for ``none``.
        dtype: the stored dtype, which sets Blosc's typesize (its item size in bytes); None lets
            zarr fill it in from the array's dtype.

    Returns:
        A tuple for ``zarr.create_array(compressors=...)``; empty for ``none``.

    Raises:
        ValueError: unknown codec or level out of range.
    """
    if codec == "none":
        return ()
    if codec == "zstd":
        if not 0 <= level <= 22:
            raise ValueError(f"zstd level must be in [0, 22], got {level}")
        return (ZstdCodec(level=level),)
    if codec in ("blosc_zstd", "blosc_lz4"):
        if not 0 <= level <= BLOSC_MAX_LEVEL:
            raise ValueError(f"blosc level must be in [0, {BLOSC_MAX_LEVEL}], got {level}")
        typesize = None if dtype is None else np.dtype(dtype).itemsize
        cname = codec.removeprefix("blosc_")
        return (BloscCodec(typesize=typesize, cname=cname, clevel=level, shuffle="shuffle"),)
    raise ValueError(f"unknown codec {codec!r}; expected zstd, blosc_zstd, blosc_lz4 or none")


def _check_dtype(dtype: str) -> None:
    if dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")


def encode_block(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations -> the numpy block stored for logical ``dtype``.

    Args:
        acts: ``[n, d_in]`` any float dtype, any device.
        dtype: ``float32``, ``float16`` or ``bfloat16`` (stored as its ``uint16`` bit pattern).

    Returns:
        ``[n, d_in]`` float32, float16 or uint16 (a CPU copy).
    """
    _check_dtype(dtype)
    np_dtype, torch_dtype = STORE_DTYPES[dtype]
    t = acts.detach().to(device="cpu", dtype=torch_dtype).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _as_torch(block: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored numpy block as a torch tensor of the logical dtype, sharing memory."""
    _check_dtype(dtype)
    np_dtype, _ = STORE_DTYPES[dtype]
    if block.dtype != np_dtype:
        raise ValueError(f"a {dtype} store holds {np_dtype}, got a {block.dtype} block")
    block = np.ascontiguousarray(block)
    if dtype == "bfloat16":
        return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(block)


def decode_block(block: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`encode_block`: a stored block ``[n, d_in]`` -> ``[n, d_in] float32``.

    Raises:
        ValueError: unknown dtype, or the block's numpy dtype is not the one ``dtype`` stores.
    """
    return _as_torch(block, dtype).to(torch.float32)


# --------------------------------------------------------------------------- writing


class _ChunkedWriter:
    """Rows ``[start, stop)`` of a zarr array, appended in order and written whole chunks at a
    time: rows are buffered so that every zarr write is exactly one chunk (the last may be
    partial when ``stop`` is the array's end). ``start`` is a chunk boundary."""

    path: Path
    d_in: int
    dtype: str
    _rows_name = "n_tokens"  # what the row count is called in error messages

    def _open_rows(self, array: zarr.Array, start: int, stop: int) -> None:
        self._array = array
        self._start, self._n_rows = start, stop - start
        self.chunk_tokens = min(int(array.chunks[0]), self._n_rows)
        np_dtype = STORE_DTYPES[self.dtype][0]
        self._buffer = np.empty((max(self.chunk_tokens, 1), self.d_in), dtype=np_dtype)
        self._n_buffered = 0
        self.n_written = 0  # rows flushed to zarr
        self._open = True

    @property
    def n_received(self) -> int:
        """Rows passed to :meth:`write` so far."""
        return self.n_written + self._n_buffered

    def write(self, acts: torch.Tensor) -> None:
        """Append ``acts: [n, d_in]`` (any float dtype, any device) after the rows so far.

        Raises:
            ValueError: wrong shape, or more rows in total than this writer writes.
            RuntimeError: the writer is closed.
        """
        if not self._open:
            raise RuntimeError(f"{type(self).__name__}({self.path}) is closed")
        if acts.ndim != 2 or acts.shape[1] != self.d_in:
            raise ValueError(f"expected [n, {self.d_in}] activations, got {list(acts.shape)}")
        if self.n_received + acts.shape[0] > self._n_rows:
            raise ValueError(
                f"{self.n_received} + {acts.shape[0]} rows exceed {self._rows_name}={self._n_rows}"
            )
        block = encode_block(acts, self.dtype)
        while len(block):
            take = min(len(block), self.chunk_tokens - self._n_buffered)
            self._buffer[self._n_buffered : self._n_buffered + take] = block[:take]
            self._n_buffered += take
            block = block[take:]
            if self._n_buffered == self.chunk_tokens:
                self._flush()

    def _flush(self) -> None:
        """Write the buffered rows (one whole chunk, or the final partial one)."""
        start, stop = self.n_written, self.n_written + self._n_buffered
        self._array[self._start + start : self._start + stop] = self._buffer[: self._n_buffered]
        self.n_written, self._n_buffered = stop, 0

    def _finish(self, on_short: str) -> None:
        """Flush; :meth:`abort` and ValueError (ending with ``on_short``) when fewer rows were
        written than this writer writes."""
        if self.n_received != self._n_rows:
            self.abort()
            raise ValueError(
                f"{type(self).__name__}({self.path}): {self.n_received} rows written, "
                f"expected {self._rows_name}={self._n_rows}{on_short}"
            )
        if self._n_buffered:
            self._flush()

    def abort(self) -> None:
        """Stop accepting rows."""
        self._open = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """The subclass's ``close()`` when the block ends normally, ``abort()`` on an exception."""
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ActivationWriter(_ChunkedWriter):
    """Append activations to a new zarr store, whole chunks at a time, atomically.

    Rows are buffered so that every zarr write is exactly one whole chunk (the last may be
    partial). The array is built under ``<path>.tmp-<pid>`` and renamed to ``path`` by
    :meth:`close` (replacing an old store); :meth:`abort`, or leaving a ``with`` block by an
    exception, removes it instead.

    Args:
        path: the store's directory.
        n_tokens: rows that will be written; a multiple of ``attrs["ctx_len"]``.
        d_in: activation width.
        store_dtype: ``float32``, ``float16`` or ``bfloat16``.
        codec, codec_level: see :func:`make_compressors`.
        chunk_tokens: rows per chunk (clamped to n_tokens).
        attrs: JSON-serialisable attributes; must hold ``ctx_len``; must not hold ``dtype``,
            ``n_tokens`` or ``d_in`` (the writer sets those).

    Raises:
        ValueError: bad sizes, dtype, codec, or attrs as above.
    """

    def __init__(
        self,
        path: str | Path,
        n_tokens: int,
        d_in: int,
        store_dtype: str,
        codec: str,
        codec_level: int,
        chunk_tokens: int,
        attrs: Mapping[str, Any],
    ) -> None:
        _check_dtype(store_dtype)
        _check_writer_args(n_tokens, d_in, chunk_tokens, attrs)
        self.path = Path(path)
        self.n_tokens, self.d_in, self.dtype = n_tokens, d_in, store_dtype
        self.attrs = store_attrs(attrs, store_dtype, n_tokens, d_in)
        compressors = make_compressors(codec, codec_level, STORE_DTYPES[store_dtype][0])
        self._tmp = _begin(self.path)  # after every check that may raise
        array = _create_array(self._tmp, n_tokens, d_in, store_dtype, compressors, chunk_tokens)
        self._open_rows(array, 0, n_tokens)

    def close(self, attrs: Mapping[str, Any] | None = None) -> None:
        """Flush, check the row count, set the attributes and move the store to ``path``.

        Args:
            attrs: more attributes known only after writing (e.g. timings); added to the rest.

        Raises:
            ValueError: fewer than ``n_tokens`` rows were written (the store is then removed).
        """
        if not self._open:
            return
        self._finish("; store removed")
        self._array.attrs.update({**(attrs or {}), **self.attrs})
        _commit(self._tmp, self.path)
        self._open = False
        logger.info(
            "wrote %d x %d %s activations to %s", self.n_tokens, self.d_in, self.dtype, self.path
        )

    def abort(self) -> None:
        """Discard everything written; ``path`` is left as it was."""
        if self._open:
            _remove(self._tmp)
            self._open = False


def store_attrs(
    attrs: Mapping[str, Any], store_dtype: str, n_tokens: int, d_in: int
) -> dict[str, Any]:
    """A store's attributes: ``attrs`` followed by those the writer sets (``dtype``,
    ``n_tokens``, ``d_in``), in the order :class:`ActivationWriter` writes them."""
    return {**attrs, "dtype": store_dtype, "n_tokens": n_tokens, "d_in": d_in}


def _create_array(
    path: Path,
    n_tokens: int,
    d_in: int,
    store_dtype: str,
    compressors: tuple[Any, ...],
    chunk_tokens: int,
) -> zarr.Array:
    return zarr.create_array(
        store=str(path),
        shape=(n_tokens, d_in),
        chunks=(min(chunk_tokens, n_tokens), d_in),
        dtype=STORE_DTYPES[store_dtype][0],
        compressors=compressors,
        zarr_format=3,
        config={"write_empty_chunks": True},  # every chunk on disk (ActivationStore checks)
    )


# --------------------------------------------------------------------------- several writers
# A store written by the ranks of a data-parallel job (saelab.cache): rank 0 creates the empty
# array (create_shared_store), each rank writes a disjoint run of whole chunks (chunk_part,
# StorePartWriter: every chunk file has one writer), and rank 0 sets the attributes once all
# ranks are done (finish_shared_store). The directory is private to the job: it lies inside
# shared_atomic_dir's temporary directory, which rank 0 moves into place at the end.


def chunk_part(n_tokens: int, chunk_tokens: int, part: int, n_parts: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of part ``part`` of a store of ``n_tokens`` rows in chunks of
    ``chunk_tokens`` (clamped to n_tokens) split into ``n_parts`` runs of whole chunks, the
    chunk counts differing by at most one (:func:`~saelab.distributed.part_bounds`; the last
    chunk, which may be partial, in the last part). A part is empty (``lo == hi``) when there
    are fewer chunks than parts."""
    chunk = min(chunk_tokens, n_tokens)
    first, last = part_bounds(-(-n_tokens // chunk), part, n_parts)
    return min(first * chunk, n_tokens), min(last * chunk, n_tokens)


def create_shared_store(
    path: str | Path,
    n_tokens: int,
    d_in: int,
    store_dtype: str,
    codec: str,
    codec_level: int,
    chunk_tokens: int,
) -> None:
    """Create at ``path`` (inside a private temporary directory) the empty array an
    :class:`ActivationWriter` with these arguments creates, for :class:`StorePartWriter` s.

    Raises:
        ValueError: bad sizes, dtype or codec.
    """
    _check_dtype(store_dtype)
    compressors = make_compressors(codec, codec_level, STORE_DTYPES[store_dtype][0])
    _create_array(Path(path), n_tokens, d_in, store_dtype, compressors, chunk_tokens)


class StorePartWriter(_ChunkedWriter):
    """Write rows ``[start, stop)`` of the array :func:`create_shared_store` made at ``path``,
    in order, whole chunks at a time (:func:`chunk_part` gives a part's rows): the only writer
    of those chunk files. Nothing is moved or removed; the enclosing temporary directory
    makes the result atomic (:func:`shared_atomic_dir`).

    Raises:
        ValueError: ``[start, stop)`` is not a run of whole chunks of the array (the last may
            be partial), or at close fewer rows were written than it holds.
    """

    _rows_name = "the part's rows"

    def __init__(self, path: str | Path, store_dtype: str, start: int, stop: int) -> None:
        self.path = Path(path)
        array = zarr.open_array(str(self.path), mode="r+")
        n_tokens, self.d_in = (int(n) for n in array.shape)
        chunk = int(array.chunks[0])
        _check_dtype(store_dtype)
        self.dtype = store_dtype
        if not (0 <= start <= stop <= n_tokens and start % chunk == 0
                and (stop % chunk == 0 or stop == n_tokens)):  # fmt: skip
            raise ValueError(
                f"StorePartWriter({path}): rows [{start}, {stop}) are not whole chunks of "
                f"{chunk} rows of a {n_tokens}-row store"
            )
        self._open_rows(array, start, stop)

    def close(self) -> None:
        """Flush and check that every row of the part was written.

        Raises:
            ValueError: fewer rows were written than the part holds.
        """
        if self._open:
            self._finish("")
            self._open = False


def finish_shared_store(path: str | Path, attrs: Mapping[str, Any]) -> None:
    """Set the attributes of a store written by :class:`StorePartWriter` s (``attrs``: all of
    them, :func:`store_attrs` first, so that ``zarr.json`` is the one
    :class:`ActivationWriter` writes)."""
    zarr.open_array(str(path), mode="r+").attrs.update(dict(attrs))
    logger.info("wrote %d x %d %s activations to %s", attrs["n_tokens"], attrs["d_in"],
                attrs["dtype"], path)  # fmt: skip


@contextmanager
def shared_atomic_dir(path: str | Path) -> Iterator[Path]:
    """:func:`atomic_dir` for every rank of a data-parallel job (:mod:`saelab.distributed`).

    Rank 0 creates ``<path>.tmp-<pid of rank 0>`` (sweeping the stale siblings of dead
    processes first) and broadcasts its name; every rank yields that directory and writes its
    own files into it (all ranks must see the same filesystem). When every rank has left the
    block normally (a barrier), rank 0 moves it to ``path``. When rank 0's block raises, or
    rank 0 is told to stop (SIGTERM: torchrun stopping the job after another rank failed),
    the directory is removed; when rank 0 is killed (SIGKILL), it stays under its temporary
    name, which the next run's sweep removes: ``path`` never holds a partial result. At world
    size 1 it is :func:`atomic_dir`.
    """
    if distributed.world_size() == 1:
        with atomic_dir(path) as tmp:
            yield tmp
        return
    if distributed.rank() != 0:
        yield Path(distributed.broadcast_object(None))
        distributed.barrier()
        return
    with atomic_dir(path) as tmp:
        distributed.broadcast_object(str(tmp))
        yield tmp
        distributed.barrier()


def _check_writer_args(
    n_tokens: int, d_in: int, chunk_tokens: int, attrs: Mapping[str, Any]
) -> None:
    if n_tokens < 1 or d_in < 1 or chunk_tokens < 1:
        raise ValueError(
            f"n_tokens, d_in, chunk_tokens must be >= 1: {n_tokens, d_in, chunk_tokens}"
        )
    if "ctx_len" not in attrs:
        raise ValueError("ActivationWriter: attrs must hold ctx_len (tokens per context)")
    if n_tokens % attrs["ctx_len"]:
        raise ValueError(f"n_tokens={n_tokens} is not a multiple of ctx_len={attrs['ctx_len']}")
    if reserved := sorted({"dtype", "n_tokens", "d_in"} & set(attrs)):
        raise ValueError(f"ActivationWriter sets {reserved} itself; remove them from attrs")


# --------------------------------------------------------------------------- reading


class ActivationStore:
    """Read access to a store written by :class:`ActivationWriter`.

    Every read checks its rows (:meth:`read_raw`): a chunk that cannot be decoded, or NaN/inf
    values, raise :class:`~saelab.config.InputError` naming the store and the rows.

    Raises:
        FileNotFoundError: no zarr array at ``path``.
        InputError: ``zarr.json`` is unreadable, an attribute of :data:`REQUIRED_ATTRS` is
            missing or disagrees with the shape, or a chunk file is missing (zarr would read
            it as zeros).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(f"activation store {path}: no zarr array (no zarr.json)")
        try:
            self._array = zarr.open_array(str(self.path), mode="r")
            self.attrs: dict[str, Any] = dict(self._array.attrs)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise InputError(f"{self.path / 'zarr.json'}: unreadable ({_reason(e)})") from e
        if missing := [k for k in REQUIRED_ATTRS if k not in self.attrs]:
            raise InputError(f"activation store {path} lacks attributes {missing}")
        if self.attrs["dtype"] not in STORE_DTYPES:
            raise InputError(
                f"activation store {path}: attribute dtype must be one of "
                f"{sorted(STORE_DTYPES)}, got {self.attrs['dtype']!r}"
            )
        self.dtype: str = self.attrs["dtype"]
        self.n_tokens: int = int(self.attrs["n_tokens"])
        self.d_in: int = int(self.attrs["d_in"])
        self.ctx_len: int = int(self.attrs["ctx_len"])
        if tuple(self._array.shape) != (self.n_tokens, self.d_in):
            raise InputError(
                f"activation store {path}: shape {self._array.shape} but attrs say "
                f"[{self.n_tokens}, {self.d_in}]"
            )
        self.chunk_tokens: int = int(self._array.chunks[0])
        self._check_chunk_files()

    def _check_chunk_files(self) -> None:
        """InputError when a chunk file is missing: zarr reads a missing chunk as its fill
        value (zeros), which would pass for activations."""
        encode = self._array.metadata.encode_chunk_key
        for index in range(self.n_chunks):
            name = encode((index, 0))
            if not (self.path / name).is_file():
                start, stop = self.chunk_range(index)
                raise InputError(
                    f"activation store {self.path}: chunk file {name} (rows {start}..{stop - 1}) "
                    "is missing: re-run the cache stage"
                )

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tokens // self.chunk_tokens)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of chunk ``index``."""
        start = index * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def read_raw(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` in the logical dtype (bfloat16, float16 or float32).

        Raises:
            InputError: a chunk of these rows cannot be read or decoded (a corrupt or truncated
                chunk file), or the rows hold NaN or inf (the message names the first such row).
        """
        try:
            block = self._array[start:stop]
        except (RuntimeError, ValueError, OSError, TypeError) as e:
            first, last = start // self.chunk_tokens, (stop - 1) // self.chunk_tokens
            chunks = f"chunk {first}" if first == last else f"chunks {first}..{last}"
            raise InputError(
                f"activation store {self.path}: {chunks} (rows {start}..{stop - 1}) unreadable "
                f"({_reason(e)}): re-run the cache stage"
            ) from e
        rows = _as_torch(block, self.dtype)
        check_finite(rows, f"activation store {self.path}", start, "re-run the cache stage")
        return rows

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)``: ``[stop - start, d_in] float32``."""
        return self.read_raw(start, stop).to(torch.float32)

    def keep_mask(self, start: int, stop: int) -> torch.Tensor:
        """``[stop - start] bool``: True where the row is not position 0 of its context."""
        return torch.arange(start, stop) % self.ctx_len != 0

    def n_usable(self, exclude_first_position: bool) -> int:
        """Rows a full pass yields: all, or all but position 0 of each context."""
        if not exclude_first_position:
            return self.n_tokens
        return self.n_tokens - len(range(0, self.n_tokens, self.ctx_len))


def _reason(e: BaseException) -> str:
    """An exception as ``<Type>: <first line>``, for a one-line error message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def check_finite(rows: torch.Tensor, what: str, first_row: int = 0, hint: str = "") -> None:
    """Raise :class:`~saelab.config.InputError` naming ``what``, the rows and the first bad row
    when ``rows`` ``[n, d_in]`` (any float dtype) hold NaN or inf. ``first_row``: the index of
    ``rows[0]`` in ``what``; ``hint``: what to do, appended after a colon.

    Fast path: the extremes (``torch.aminmax``, which propagates NaN; an inf is an extreme) are
    finite exactly when every value is, in one reduction without a boolean copy of the block.
    """
    if rows.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(rows)):
        return
    finite = torch.isfinite(rows)
    bad = (~finite).any(-1).nonzero()[:, 0]
    raise InputError(
        f"{what}: rows {first_row}..{first_row + len(rows) - 1} hold {int((~finite).sum())} "
        f"NaN/inf values in {len(bad)} rows, the first in row {first_row + int(bad[0])}"
        + (f": {hint}" if hint else "")
    )


class ShuffledBatches:
    """Infinite, seeded stream of token-shuffled training batches ``[batch_size, d_in] float32``.

    Each epoch visits the chunks in a random order, ``shuffle_chunks`` at a time: their rows
    (position 0 of each context dropped when ``exclude_first_position``) plus the remainder
    carried from the previous group form one buffer, which is permuted at token level and cut
    into full batches; the incomplete remainder (< batch_size rows) is carried into the next
    group, across epochs too, so no row is ever dropped. Every usable row is yielded once per
    epoch; when ``tokens_per_epoch`` is a multiple of ``batch_size``, each run of
    ``tokens_per_epoch // batch_size`` batches from the start is exactly one epoch.

    Memory: one group's buffer (``shuffle_chunks`` chunks in the stored dtype; the previous
    group's is released before the next is read) plus one float32 batch. Reproducible:
    one ``torch.Generator`` seeded with ``seed`` drives both the chunk order and the
    permutations; successive epochs differ.

    ``part = (i, n)`` (data-parallel training): yield only part i of every batch, the rows
    :func:`~saelab.distributed.part_bounds` gives; the n parts of a batch are disjoint and in
    order make up the batch a ``(0, 1)`` stream yields. Every part reads (and decompresses) the
    same chunks, since each batch draws its tokens from the whole shuffle buffer; only the
    part's rows are gathered and converted to float32.

    Raises:
        ValueError: batch_size or shuffle_chunks < 1, or the store yields no usable rows.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        *,
        exclude_first_position: bool,
        shuffle_chunks: int,
        seed: int,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        if not 0 <= part[0] < part[1]:
            raise ValueError(f"part must be (index, n_parts) with 0 <= index < n_parts: {part}")
        if batch_size < 1 or shuffle_chunks < 1:
            raise ValueError(
                f"batch_size and shuffle_chunks must be >= 1: {batch_size, shuffle_chunks}"
            )
        self.store = ActivationStore(path)
        self.batch_size = batch_size
        self.part = part
        self.exclude_first_position = exclude_first_position
        self.shuffle_chunks = shuffle_chunks
        self.tokens_per_epoch = self.store.n_usable(exclude_first_position)
        if self.tokens_per_epoch == 0:
            raise ValueError(f"activation store {path} has no usable rows")
        self.epoch = 0  # epochs started so far
        self._generator = torch.Generator().manual_seed(seed)
        self._raw_dtype = STORE_DTYPES[self.store.dtype][1]
        self._batches = self._stream()

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._batches)

    def _stream(self) -> Iterator[torch.Tensor]:
        carry = torch.empty(0, self.store.d_in, dtype=self._raw_dtype)
        lo, hi = part_bounds(self.batch_size, *self.part)
        while True:
            self.epoch += 1
            order = torch.randperm(self.store.n_chunks, generator=self._generator).tolist()
            for g in range(0, len(order), self.shuffle_chunks):
                # Drop the previous group's buffer first, or it stays alive while the next one
                # is filled and the peak is two groups (bench/memory.py).
                buffer = rows = None
                buffer, rows = self._load(order[g : g + self.shuffle_chunks], carry)
                rows = rows[torch.randperm(len(rows), generator=self._generator)]
                n_full = len(rows) // self.batch_size
                for b in range(n_full):
                    yield buffer[rows[b * self.batch_size + lo : b * self.batch_size + hi]].float()
                carry = buffer[rows[n_full * self.batch_size :]]

    def _load(self, chunks: list[int], carry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Carry + the given chunks in one buffer, and the indices of its usable rows.

        The buffer keeps the store's logical dtype (bf16 takes half the memory and half the
        gather traffic of float32); batches are converted to float32 when yielded.

        Returns:
            buffer ``[n_carry + chunk rows, d_in]`` bfloat16/float16/float32, rows
            ``[n_usable] int64``.
        """
        ranges = [self.store.chunk_range(c) for c in chunks]
        n_rows = len(carry) + sum(b - a for a, b in ranges)
        buffer = torch.empty(n_rows, self.store.d_in, dtype=self._raw_dtype)
        buffer[: len(carry)] = carry
        rows, offset = [torch.arange(len(carry))], len(carry)
        for start, stop in ranges:
            buffer[offset : offset + stop - start] = self.store.read_raw(start, stop)
            local = torch.arange(stop - start)
            if self.exclude_first_position:
                local = local[self.store.keep_mask(start, stop)]
            rows.append(local + offset)
            offset += stop - start
        return buffer, torch.cat(rows)


def iter_batches(
    path: str | Path, batch_size: int, *, exclude_first_position: bool
) -> Iterator[torch.Tensor]:
    """One sequential pass over a store in row order, for evaluation.

    Yields:
        ``[batch_size, d_in] float32`` batches of consecutive usable rows (position 0 of each
        context dropped when ``exclude_first_position``); the last batch may be smaller.

    Raises:
        ValueError: batch_size < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store = ActivationStore(path)
    carry = torch.empty(0, store.d_in, dtype=STORE_DTYPES[store.dtype][1])
    for c in range(store.n_chunks):
        start, stop = store.chunk_range(c)
        block = store.read_raw(start, stop)  # stored dtype; float32 per batch below
        if exclude_first_position:
            block = block[store.keep_mask(start, stop)]
        block = torch.cat([carry, block])
        n_full = len(block) // batch_size
        for b in range(n_full):
            yield block[b * batch_size : (b + 1) * batch_size].float()
        carry = block[n_full * batch_size :]
    if len(carry):
        yield carry.float()


def median_norm(path: str | Path, n_tokens: int, *, exclude_first_position: bool) -> float:
    """Median L2 norm of the first ``n_tokens`` usable rows of a store (same units as the
    activations). Used to set the absolute norm above which a token counts as a sink."""
    norms = [x.norm(dim=-1) for x in _take(iter_batches(path, 8192, exclude_first_position=
             exclude_first_position), n_tokens)]  # fmt: skip
    return float(torch.cat(norms).median())


def sink_norm(
    path: str | Path, factor: float | None, n_tokens: int, *, exclude_first_position: bool
) -> float | None:
    """The norm above which a token counts as an attention sink: ``factor`` × the
    :func:`median_norm` of the first ``n_tokens`` usable rows of the store at ``path`` (the
    training store: the rule the SAEs are trained with), or None when ``factor`` is None (no
    norm cut). See ``SAEConfig.exclude_norm_factor``."""
    if factor is None:
        return None
    return factor * median_norm(path, n_tokens, exclude_first_position=exclude_first_position)


def _take(batches: Iterator[torch.Tensor], n_tokens: int) -> Iterator[torch.Tensor]:
    seen = 0
    for x in batches:
        if seen >= n_tokens:
            return
        yield x[: n_tokens - seen]
        seen += len(x)


def drop_outliers(
    batches: Iterable[torch.Tensor], max_norm: float | None
) -> Iterator[torch.Tensor]:
    """Remove rows whose L2 norm exceeds ``max_norm`` (massive-activation sinks) from each
    ``[batch, d_in]`` batch; ``None`` passes batches through. Batches may get a few rows shorter."""
    for x in batches:
        yield x if max_norm is None else x[x.norm(dim=-1) <= max_norm]
