"""Specifications of saelab.data: decoding, reading, splitting, packing and storing tokens."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from saelab.data import (
    Document,
    decode_text,
    docs_per_source,
    fallback_decoded,
    pack_contexts,
    prepare_tokens,
    read_corpus,
    read_token_attrs,
    read_tokens,
    separator_token_id,
    split_documents,
    write_tokens,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "data" / "models" / "smollm2-135m-instruct"


class FakeTokenizer:
    """Whitespace tokenizer whose tokens are integers: ``"4 5"`` -> ``[4, 5]``.

    With ``add_special_tokens=True`` it prepends BOS (99), so a test can see if one slipped in.
    """

    bos_token_id = 99

    def __init__(self, vocab: dict[str, int] | None = None, eos_token_id: int | None = None):
        self.vocab = {"<|endoftext|>": 0} if vocab is None else vocab
        self.eos_token_id = eos_token_id
        self.calls: list[dict] = []

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def __call__(self, texts: list[str], add_special_tokens: bool = True, **kwargs):
        self.calls.append({"add_special_tokens": add_special_tokens, **kwargs})
        bos = [self.bos_token_id] if add_special_tokens else []
        return {"input_ids": [bos + [int(w) for w in t.split()] for t in texts]}


def doc(source: str, name: str, text: str = "1 2 3") -> Document:
    return Document(source=source, name=name, text=text, encoding="utf-8")


# --------------------------------------------------------------------------- decode_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("café".encode(), ("café", "utf-8")),
        (b"\xef\xbb\xbf" + "café".encode(), ("café", "utf-8-sig")),  # BOM stripped
        ("café".encode("latin-1"), ("café", "cp1252")),  # 0xE9 is not valid UTF-8
        (b"\x93quoted\x94", ("\u201cquoted\u201d", "cp1252")),  # cp1252 curly quotes
        (b"caf\xe9 \x81", ("caf\xe9 \x81", "latin-1")),  # 0x81 is undefined in cp1252
        # Big5 quotes in ASCII text (as in the 1970-74 Nixon speeches): 0xA1A5/0xA1A6 are
        # U+2018/U+2019 in Big5; cp1252 would give "man\xa1\xa6s"
        (b"man\xa1\xa6s \xa1@word", ("man\u2019s  word", "big5")),  # 0xA1 0x40: U+3000 -> " "
        # Big5-decodable but not punctuation (a CJK ideograph): cp1252 is kept
        (b"\xa4\xa4", ("\xa4\xa4", "cp1252")),
        (b"", ("", "utf-8")),
    ],
)
def test_decode_text_known_answers(raw: bytes, expected: tuple[str, str]) -> None:
    """UTF-8 (BOM stripped) first, then Big5 punctuation, then cp1252, then Latin-1; the codec
    used is reported."""
    assert decode_text(raw) == expected


def test_decode_text_never_fails_on_any_byte() -> None:
    """Every byte sequence decodes (Latin-1 maps all 256 bytes)."""
    text, _ = decode_text(bytes(range(256)))
    assert len(text) > 0


# --------------------------------------------------------------------------- read_corpus


def make_corpus(root: Path) -> list[Path]:
    a, b = root / "alpha", root / "beta"
    a.mkdir()
    b.mkdir()
    (a / "z.txt").write_text("zed", encoding="utf-8")
    (a / "y.txt").write_bytes("naïve".encode("latin-1"))
    (a / ".hidden").write_text("hidden")
    (a / "README.alpha").write_text("about alpha")
    (a / "blank.txt").write_text(" \n\t ")
    (a / "sub").mkdir()
    (a / "sub" / "inner.txt").write_text("not read: non-recursive")
    (b / "b.txt").write_bytes(b"\xef\xbb\xbfbeta")
    return [b, a]


def test_read_corpus_selects_sorts_and_decodes(tmp_path: Path) -> None:
    """Regular, visible, non-README, non-blank files only; sorted by (source, name)."""
    docs = read_corpus(make_corpus(tmp_path))
    assert [(d.source, d.name, d.text, d.encoding) for d in docs] == [
        ("alpha", "y.txt", "naïve", "cp1252"),
        ("alpha", "z.txt", "zed", "utf-8"),
        ("beta", "b.txt", "beta", "utf-8-sig"),
    ]


def test_read_corpus_reports_fallback_encodings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Latin-1 file is logged and listed by fallback_decoded; UTF-8 files are not."""
    with caplog.at_level(logging.INFO, logger="saelab.data"):
        docs = read_corpus(make_corpus(tmp_path))
    assert fallback_decoded(docs) == ["alpha/y.txt (cp1252)"]
    assert "1 needed a non-UTF-8 fallback" in caplog.text
    assert "alpha/y.txt" in caplog.text


def test_read_corpus_rejects_empty_inputs(tmp_path: Path) -> None:
    """No dirs, a missing dir, or a dir with only README/blank files is a ValueError."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("docs")
    (empty / "blank.txt").write_text("\n")
    with pytest.raises(ValueError, match="no corpus directories"):
        read_corpus([])
    with pytest.raises(ValueError, match="not a directory"):
        read_corpus([tmp_path / "missing"])
    with pytest.raises(ValueError, match="holds no non-empty documents"):
        read_corpus([empty])


def test_read_corpus_rejects_duplicate_source_names(tmp_path: Path) -> None:
    """Two directories with the same name would merge two sources: a ValueError."""
    for parent in ("p", "q"):
        (tmp_path / parent / "src").mkdir(parents=True)
        (tmp_path / parent / "src" / "a.txt").write_text("a")
    with pytest.raises(ValueError, match="distinct names"):
        read_corpus([tmp_path / "p" / "src", tmp_path / "q" / "src"])


# --------------------------------------------------------------------------- split_documents


def corpus_of_sizes(sizes: dict[str, int]) -> list[Document]:
    return [doc(s, f"{i:02d}.txt") for s, n in sizes.items() for i in range(n)]


def test_split_counts_per_source() -> None:
    """Eval per source = max(1, round(f * n)), capped at n - 1 for n >= 2; n = 1 -> eval only."""
    docs = corpus_of_sizes({"big": 10, "mid": 3, "pair": 2, "solo": 1})
    train, evals = split_documents(docs, eval_fraction=0.6, seed=0)
    # big: round(6.0) = 6; mid: round(1.8) = 2; pair: round(1.2) = 1; solo: all to eval
    assert docs_per_source(evals) == {"big": 6, "mid": 2, "pair": 1, "solo": 1}
    assert docs_per_source(train) == {"big": 4, "mid": 1, "pair": 1}
    small_f_train, small_f_eval = split_documents(docs, eval_fraction=0.01, seed=0)
    assert docs_per_source(small_f_eval) == {"big": 1, "mid": 1, "pair": 1, "solo": 1}


def test_split_is_a_partition_by_document() -> None:
    """Every document lands in exactly one split; both splits are sorted by (source, name)."""
    docs = corpus_of_sizes({"a": 7, "b": 5})
    train, evals = split_documents(docs, eval_fraction=0.3, seed=3)
    keys = Counter(d.key for d in train + evals)
    assert set(keys) == {d.key for d in docs} and set(keys.values()) == {1}
    for part in (train, evals):
        assert part == sorted(part, key=lambda d: (d.source, d.name))


def test_split_is_deterministic_and_seeded() -> None:
    """Same seed -> same split regardless of input order; another seed -> another split."""
    docs = corpus_of_sizes({"a": 20, "b": 20})
    first = split_documents(docs, 0.25, seed=1)
    assert split_documents(list(reversed(docs)), 0.25, seed=1) == first
    assert split_documents(docs, 0.25, seed=2) != first


def test_split_of_a_source_does_not_depend_on_other_sources() -> None:
    """Adding a source leaves the existing sources' splits unchanged."""
    a_only = split_documents(corpus_of_sizes({"a": 12}), 0.25, seed=5)
    with_b = split_documents(corpus_of_sizes({"a": 12, "b": 4}), 0.25, seed=5)
    assert [d for d in with_b[1] if d.source == "a"] == a_only[1]


def test_split_rejects_bad_fraction() -> None:
    """eval_fraction outside (0, 1) is a ValueError."""
    with pytest.raises(ValueError, match="eval_fraction"):
        split_documents(corpus_of_sizes({"a": 3}), 1.0, seed=0)


# --------------------------------------------------------------------------- packing


def test_pack_contexts_known_answer() -> None:
    """doc0 SEP doc1 SEP doc2, no BOS, cut into ctx_len rows, remainder dropped."""
    tok = FakeTokenizer()
    docs = [doc("s", "a", "1 2 3"), doc("s", "b", "4 5"), doc("s", "c", "6 7 8 9")]
    # stream: 1 2 3 0 4 5 0 6 7 8 9 (11 tokens) -> 2 contexts of 4, [7 8 9] dropped
    out = pack_contexts(docs, tok, ctx_len=4)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[1, 2, 3, 0], [4, 5, 0, 6]])
    assert all(not c["add_special_tokens"] for c in tok.calls)


def test_pack_contexts_exact_fit_and_too_short() -> None:
    """A stream of exactly k * ctx_len tokens gives k rows; a shorter one gives [0, ctx_len]."""
    tok = FakeTokenizer()
    np.testing.assert_array_equal(
        pack_contexts([doc("s", "a", "1 2"), doc("s", "b", "3")], tok, ctx_len=2), [[1, 2], [0, 3]]
    )
    assert pack_contexts([doc("s", "a", "1 2")], tok, ctx_len=3).shape == (0, 3)


def test_separator_token_id_rules() -> None:
    """<|endoftext|> if in the vocab, else EOS, else ValueError."""
    assert separator_token_id(FakeTokenizer({"<|endoftext|>": 5, "x": 0}, eos_token_id=7)) == 5
    assert separator_token_id(FakeTokenizer({"x": 0}, eos_token_id=7)) == 7
    with pytest.raises(ValueError, match="neither"):
        separator_token_id(FakeTokenizer({"x": 0}))


@pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason="shared SmolLM2 tokenizer not present")
def test_pack_contexts_real_tokenizer(caplog: pytest.LogCaptureFixture) -> None:
    """SmolLM2: separator is <|endoftext|> = 0, never the chat BOS/EOS; no length warning."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert separator_token_id(tok) == 0
    texts = ["The cat sat on the mat.", "A second document. " * 600]  # the second is long
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = ids[0] + [0] + ids[1]
    ctx_len = 16
    with caplog.at_level(logging.WARNING):
        out = pack_contexts([doc("s", "a", texts[0]), doc("s", "b", texts[1])], tok, ctx_len)
    n_ctx = len(stream) // ctx_len
    np.testing.assert_array_equal(out, np.array(stream[: n_ctx * ctx_len]).reshape(n_ctx, ctx_len))
    assert tok.bos_token_id not in out and tok.eos_token_id not in out
    assert "sequence length" not in caplog.text


def test_prepare_tokens_shuffles_context_order_only() -> None:
    """Each split holds its own packed contexts, rows permuted (seeded), rows intact."""
    tok = FakeTokenizer()
    train_docs = [doc("s", "a", " ".join(str(i) for i in range(1, 41)))]
    eval_docs = [doc("s", "b", " ".join(str(i) for i in range(100, 120)))]
    out = prepare_tokens(train_docs, eval_docs, tok, ctx_len=4, seed=0)
    for split, docs in (("train", train_docs), ("eval", eval_docs)):
        packed = pack_contexts(docs, tok, 4)
        assert out[split].dtype == np.int32 and out[split].shape == packed.shape
        assert sorted(map(tuple, out[split])) == sorted(map(tuple, packed))
    assert not np.array_equal(out["train"], pack_contexts(train_docs, tok, 4))
    again = prepare_tokens(train_docs, eval_docs, tok, ctx_len=4, seed=0)
    np.testing.assert_array_equal(again["train"], out["train"])
    with pytest.raises(ValueError, match="eval split"):
        prepare_tokens(train_docs, [doc("s", "c", "1")], tok, ctx_len=4, seed=0)


# --------------------------------------------------------------------------- zarr round trip


def test_write_read_tokens_round_trip(tmp_path: Path) -> None:
    """Arrays and attrs come back; sizes are added; a rewrite replaces; no temp dir is left."""
    out = tmp_path / "tokens.zarr"
    splits = {
        "train": np.arange(24, dtype=np.int32).reshape(6, 4),
        "eval": np.arange(8, dtype=np.int32).reshape(2, 4),
    }
    write_tokens(out, splits, {"seed": 3, "corpus_dirs": ["a", "b"]})
    for split, arr in splits.items():
        back = read_tokens(out, split)
        assert back.dtype == np.int32
        np.testing.assert_array_equal(back, arr)
    attrs = read_token_attrs(out)
    assert attrs["seed"] == 3 and attrs["corpus_dirs"] == ["a", "b"] and attrs["ctx_len"] == 4
    assert attrs["n_tokens"] == {"train": 24, "eval": 8}
    assert attrs["n_ctx"] == {"train": 6, "eval": 2}
    write_tokens(out, {k: v[:1] for k, v in splits.items()}, {"seed": 4})
    assert read_tokens(out, "train").shape == (1, 4) and read_token_attrs(out)["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.zarr"]
    with pytest.raises(KeyError, match="no split"):
        read_tokens(out, "test")


def test_write_tokens_validates(tmp_path: Path) -> None:
    """Wrong split names, dtype or a ctx_len mismatch are ValueErrors and write nothing."""
    good = np.zeros((2, 4), dtype=np.int32)
    out = tmp_path / "t.zarr"
    with pytest.raises(ValueError, match="exactly"):
        write_tokens(out, {"train": good}, {})
    with pytest.raises(ValueError, match="int32"):
        write_tokens(out, {"train": good, "eval": good.astype(np.int64)}, {})
    with pytest.raises(ValueError, match="ctx_len"):
        write_tokens(out, {"train": good, "eval": good}, {"ctx_len": 8})
    assert list(tmp_path.iterdir()) == []
