"""Corpus -> packed token contexts (the ``prepare`` stage's library).

A corpus is a list of directories of plain-text files, one document per file; the directory's
name is the document's *source*. Documents are split into train/eval *by document*, stratified
per source, then each split is tokenized without BOS, joined with the document separator
(``<|endoftext|>``) and cut into ``ctx_len``-token contexts. The two splits are stored as int32
arrays ``train`` and ``eval`` of shape ``[n_ctx, ctx_len]`` in a zarr v3 group whose attributes
record the provenance.
"""

from __future__ import annotations

import codecs
import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from saelab.store import atomic_dir

logger = logging.getLogger(__name__)

SEPARATOR_TOKEN = "<|endoftext|>"
SPLITS = ("train", "eval")
UTF8_ENCODINGS = ("utf-8", "utf-8-sig")
_TOKENIZE_BATCH_DOCS = 32
_TOKEN_CHUNK_TOKENS = 1 << 20  # zarr chunk of the token arrays: ~1M tokens (4 MiB int32)


@dataclass(frozen=True)
class Document:
    """One corpus file.

    source: name of the corpus directory it came from (e.g. ``"gutenberg"``).
    name: file name inside that directory.
    text: decoded contents.
    encoding: the codec that decoded it (``utf-8``, ``utf-8-sig``, ``cp1252`` or ``latin-1``).
    """

    source: str
    name: str
    text: str
    encoding: str

    @property
    def key(self) -> str:
        """``source/name``, unique within a corpus."""
        return f"{self.source}/{self.name}"


def decode_text(raw: bytes) -> tuple[str, str]:
    """Decode file bytes as UTF-8 (a leading BOM stripped), else Big5 punctuation, else cp1252,
    else Latin-1.

    Big5 is accepted only when every non-ASCII character it yields is typographic punctuation
    (U+2010..U+2026: dashes, curly quotes, ellipsis) or the ideographic space U+3000 (turned into
    a plain space): some speeches in the shared corpus (Nixon
    1970-74, Bush 2005) carry Big5-encoded quotes in otherwise ASCII text, which cp1252 would turn
    into junk such as ``man\u00a1\u00a6s``. Real Latin-1 text never passes that test. Latin-1
    maps every byte to a character, so this never fails.

    Returns:
        (text, encoding): encoding is ``"utf-8-sig"`` when a UTF-8 BOM was stripped, else
        ``"utf-8"``, ``"big5"``, ``"cp1252"`` or ``"latin-1"``.
    """
    try:
        text = raw.decode("utf-8-sig")
        return text, "utf-8-sig" if raw.startswith(codecs.BOM_UTF8) else "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("big5").replace("\u3000", " ")
        if all(ord(c) < 128 or "\u2010" <= c <= "\u2026" for c in text):
            return text, "big5"
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def _is_document_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and not path.name.startswith("README")


def _read_dir(directory: Path) -> list[Document]:
    """Documents of one corpus directory, sorted by file name."""
    docs = []
    for path in sorted(p for p in directory.iterdir() if _is_document_file(p)):
        text, encoding = decode_text(path.read_bytes())
        if not text.strip():
            logger.warning("skipping %s: empty or whitespace-only", path)
            continue
        docs.append(Document(directory.name, path.name, text, encoding))
    return docs


def read_corpus(dirs: Iterable[str | Path]) -> list[Document]:
    """Read every document of every corpus directory.

    Each directory's regular files are read (non-recursive); hidden files, ``README*`` files and
    files that decode to empty or whitespace-only text are skipped. See :func:`decode_text` for
    the encodings tried; documents that needed a non-UTF-8 fallback are logged.

    Returns:
        Documents sorted by (source, name).

    Raises:
        ValueError: no directories given, a path is not a directory, two directories share a
            name (the source name must be unique), or a directory holds no documents.
    """
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("read_corpus: no corpus directories given")
    names = Counter(d.name for d in dirs)
    if dup := [n for n, c in names.items() if c > 1]:
        raise ValueError(f"read_corpus: corpus directories must have distinct names; {dup} repeat")
    docs: list[Document] = []
    for directory in dirs:
        if not directory.is_dir():
            raise ValueError(f"read_corpus: {directory} is not a directory")
        found = _read_dir(directory)
        if not found:
            raise ValueError(f"read_corpus: {directory} holds no non-empty documents")
        docs.extend(found)
    docs.sort(key=lambda d: (d.source, d.name))
    fallback = fallback_decoded(docs)
    logger.info(
        "read %d documents from %d directories; %d needed a non-UTF-8 fallback encoding%s",
        len(docs),
        len(dirs),
        len(fallback),
        f": {fallback}" if fallback else "",
    )
    return docs


def fallback_decoded(docs: Iterable[Document]) -> list[str]:
    """``source/name (encoding)`` of every document not decoded as UTF-8, in input order."""
    return [f"{d.key} ({d.encoding})" for d in docs if d.encoding not in UTF8_ENCODINGS]


def docs_per_source(docs: Iterable[Document]) -> dict[str, int]:
    """Number of documents per source, sorted by source name."""
    return dict(sorted(Counter(d.source for d in docs).items()))


def _n_eval(n_docs: int, eval_fraction: float) -> int:
    """Eval documents for a source of ``n_docs``: >= 1, and < n_docs when n_docs >= 2."""
    n_eval = max(1, round(eval_fraction * n_docs))
    return min(n_eval, n_docs - 1) if n_docs >= 2 else n_docs


def split_documents(
    docs: Sequence[Document], eval_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split documents into train and eval, by document and stratified per source.

    Each source of ``n`` documents contributes ``max(1, round(eval_fraction * n))`` eval documents
    (Python's ``round``), capped at ``n - 1`` so that a source of >= 2 documents keeps one for
    training; a single-document source goes wholly to eval (logged). The choice is a seeded
    permutation of the source's documents sorted by name, seeded by ``(seed, crc32(source))``, so
    one source's split does not depend on which other sources are present.

    Returns:
        (train, eval): both sorted by (source, name); every document is in exactly one.

    Raises:
        ValueError: eval_fraction not in (0, 1), or two documents share (source, name).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"split_documents: eval_fraction must be in (0, 1), got {eval_fraction}")
    keys = Counter(d.key for d in docs)
    if dup := [k for k, c in keys.items() if c > 1]:
        raise ValueError(f"split_documents: duplicate documents {dup[:5]}")
    train: list[Document] = []
    evals: list[Document] = []
    for source in docs_per_source(docs):
        group = sorted((d for d in docs if d.source == source), key=lambda d: d.name)
        rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
        order = rng.permutation(len(group))
        n_eval = _n_eval(len(group), eval_fraction)
        if n_eval == len(group):
            logger.warning("source %r has one document: it goes to eval only", source)
        evals.extend(group[i] for i in sorted(order[:n_eval]))
        train.extend(group[i] for i in sorted(order[n_eval:]))
    return train, evals


def separator_token_id(tokenizer: Any) -> int:
    """Id of the document separator: ``<|endoftext|>`` if in the vocabulary, else EOS.

    Raises:
        ValueError: the tokenizer has neither.
    """
    token_id = tokenizer.get_vocab().get(SEPARATOR_TOKEN)
    if token_id is None:
        token_id = getattr(tokenizer, "eos_token_id", None)
    if token_id is None:
        raise ValueError(f"tokenizer has neither {SEPARATOR_TOKEN!r} nor an EOS token")
    return int(token_id)


def _tokenize(texts: Sequence[str], tokenizer: Any) -> list[np.ndarray]:
    """Token ids of each text, no special tokens: a list of ``[n_i] int32``.

    ``verbose=False`` silences the "longer than the maximum sequence length" warning: documents
    are longer than the model's context on purpose, they are cut into contexts afterwards.
    """
    out: list[np.ndarray] = []
    for i in range(0, len(texts), _TOKENIZE_BATCH_DOCS):
        batch = list(texts[i : i + _TOKENIZE_BATCH_DOCS])
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        out.extend(np.asarray(x, dtype=np.int32) for x in ids)
    return out


def pack_contexts(docs: Sequence[Document], tokenizer: Any, ctx_len: int) -> np.ndarray:
    """Tokenize documents, join them with the separator and cut into contexts.

    The token stream is ``doc_0 SEP doc_1 SEP ... doc_{n-1}`` (no BOS, no separator before the
    first or after the last document), in the given document order; it is cut into consecutive
    ``ctx_len`` pieces and the incomplete remainder is dropped.

    Returns:
        ``[n_ctx, ctx_len] int32``, ``n_ctx = n_stream_tokens // ctx_len`` (may be 0).

    Raises:
        ValueError: ctx_len < 1, or no separator (see :func:`separator_token_id`).
    """
    if ctx_len < 1:
        raise ValueError(f"pack_contexts: ctx_len must be >= 1, got {ctx_len}")
    sep = np.array([separator_token_id(tokenizer)], dtype=np.int32)
    pieces: list[np.ndarray] = []
    for i, ids in enumerate(_tokenize([d.text for d in docs], tokenizer)):
        if i > 0:
            pieces.append(sep)
        pieces.append(ids)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    n_ctx = len(stream) // ctx_len
    logger.info(
        "packed %d documents: %d tokens -> %d contexts of %d (%d dropped)",
        len(docs),
        len(stream),
        n_ctx,
        ctx_len,
        len(stream) - n_ctx * ctx_len,
    )
    return stream[: n_ctx * ctx_len].reshape(n_ctx, ctx_len)


def prepare_tokens(
    docs_train: Sequence[Document],
    docs_eval: Sequence[Document],
    tokenizer: Any,
    ctx_len: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Pack both splits and shuffle the order of their contexts (seeded).

    Shuffling context order makes every stretch of the arrays (hence every activation chunk)
    mix sources; the tokens inside a context keep their order.

    Returns:
        ``{"train": [n_train_ctx, ctx_len] int32, "eval": [n_eval_ctx, ctx_len] int32}``.

    Raises:
        ValueError: a split yields no complete context.
    """
    out = {}
    for i, (split, docs) in enumerate((("train", docs_train), ("eval", docs_eval))):
        contexts = pack_contexts(docs, tokenizer, ctx_len)
        if len(contexts) == 0:
            raise ValueError(f"prepare_tokens: the {split} split has fewer than {ctx_len} tokens")
        rng = np.random.default_rng([seed, i])
        out[split] = contexts[rng.permutation(len(contexts))]
    return out


def write_tokens(
    out_dir: str | Path, splits: Mapping[str, np.ndarray], attrs: Mapping[str, Any]
) -> None:
    """Write the token splits as a zarr v3 group, atomically (see :func:`saelab.store.atomic_dir`).

    Args:
        out_dir: the group's directory; an existing one is replaced.
        splits: exactly ``train`` and ``eval``, each ``[n_ctx, ctx_len] int32``.
        attrs: JSON-serialisable provenance (corpus dirs, docs per source and split, fallback-
            decoded files, tokenizer, separator id, seed, ...). ``ctx_len``, ``n_ctx`` and
            ``n_tokens`` (per split) are computed from the arrays and added.

    Raises:
        ValueError: other split names, arrays not 2-D int32, different ctx_len across splits, or
            an ``attrs["ctx_len"]`` that disagrees with the arrays.
    """
    if set(splits) != set(SPLITS):
        raise ValueError(f"write_tokens: splits must be exactly {SPLITS}, got {sorted(splits)}")
    ctx_lens = {a.shape[1] for a in splits.values() if a.ndim == 2}
    if any(a.ndim != 2 or a.dtype != np.int32 for a in splits.values()) or len(ctx_lens) != 1:
        raise ValueError("write_tokens: splits must be [n_ctx, ctx_len] int32 with one ctx_len")
    ctx_len = ctx_lens.pop()
    if attrs.get("ctx_len", ctx_len) != ctx_len:
        raise ValueError(
            f"write_tokens: attrs ctx_len={attrs['ctx_len']} but arrays have {ctx_len}"
        )
    full_attrs = {
        **attrs,
        "ctx_len": int(ctx_len),
        "n_ctx": {s: int(a.shape[0]) for s, a in splits.items()},
        "n_tokens": {s: int(a.size) for s, a in splits.items()},
    }
    chunk_rows = max(1, _TOKEN_CHUNK_TOKENS // ctx_len)
    with atomic_dir(out_dir) as tmp:
        group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=full_attrs)
        for split in SPLITS:
            arr = splits[split]
            group.create_array(split, data=arr, chunks=(min(chunk_rows, max(1, len(arr))), ctx_len))
    logger.info("wrote token splits %s to %s", full_attrs["n_tokens"], out_dir)


def read_tokens(path: str | Path, split: str) -> np.ndarray:
    """One split of a token group written by :func:`write_tokens`: ``[n_ctx, ctx_len] int32``.

    Raises:
        FileNotFoundError: no zarr group at ``path``.
        KeyError: the group has no array ``split``.
    """
    group = zarr.open_group(str(path), mode="r")
    if split not in group:
        raise KeyError(f"read_tokens: {path} has no split {split!r} (has {sorted(group.keys())})")
    return np.asarray(group[split][:], dtype=np.int32)


def read_token_attrs(path: str | Path) -> dict[str, Any]:
    """The provenance attributes of a token group written by :func:`write_tokens`."""
    return dict(zarr.open_group(str(path), mode="r").attrs)
