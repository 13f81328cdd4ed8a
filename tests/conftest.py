"""Test-wide setup and fixtures: no test may reach the network (Hugging Face hub included).

Models are tiny random Llama / GPT-2 / Gemma 2 built from configs and saved to a temp dir with
the real SmolLM2 tokenizer from ../shared (a local copy: nothing is downloaded).
"""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOLLM2_DIR = SHARED / "data" / "models" / "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_DIR = SHARED / "data" / "corpus"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VOCAB = 49152


def _save_tiny(arch: str, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "gemma2":  # soft-capping at 1 nat: far from the identity on these logits
        config = Gemma2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
            max_position_embeddings=256, sliding_window=8, final_logit_softcapping=1.0,
        )  # fmt: skip
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True,
        )  # fmt: skip
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(SMOLLM2_DIR / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama (d_model 64, SmolLM2's vocabulary and tokenizer) on disk."""
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer GPT-2 (d_model 64, SmolLM2's vocabulary and tokenizer) on disk."""
    return _save_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Gemma 2 (d_model 64, sliding window 8, final logit soft-capping at 1)
    with SmolLM2's vocabulary and tokenizer, on disk: logits transformed after the LM head."""
    return _save_tiny("gemma2", tmp_path_factory.mktemp("tiny-gemma2"))


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> list[str]:
    """Two small sources of real text from ../shared (one Latin-1 file among them), as
    corpus directories: 4 documents each, a few thousand tokens in all."""
    dirs = []
    for source, names in {
        "us-speeches": ["1954-Eisenhower.txt", "1961-Kennedy.txt", "1962-Kennedy.txt",
                        "1970-Nixon.txt"],
        "wikitext-2": sorted(p.name for p in (CORPUS_DIR / "wikitext-2").iterdir())[:4],
    }.items():  # fmt: skip
        d = tmp_path / "corpus" / source
        d.mkdir(parents=True)
        for name in names:
            (d / name).write_bytes((CORPUS_DIR / source / name).read_bytes()[:6000])
        dirs.append(str(d))
    return dirs


def tiny_params(model_dir: Path, corpus_dirs: list[str], tracking_uri: str | None) -> dict:
    """A full params mapping (the shape of params.yaml) sized for seconds on a CPU."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["k"] = 8
    params["data"].update(corpus_dirs=corpus_dirs, ctx_len=32, eval_fraction=0.25)
    params["model"].update(  # dtype fixed: model.dtype auto would depend on the CPU
        name_or_path=str(model_dir), gguf_file=None, hookpoint="blocks.2.hook_resid_pre",
        dtype="float32",
    )  # fmt: skip
    params["cache"].update(
        max_train_tokens=4096, max_eval_tokens=1024, batch_size=8, chunk_tokens=1024
    )
    params["sae"].update(d_sae=128)
    params["train"].update(
        n_tokens=4096, batch_size=256, scale_tokens=512, dead_tokens=2048, k_aux=32,
        warmup_steps=2, log_every=4, checkpoint_every=8, shuffle_chunks=2,
    )  # fmt: skip
    params["evaluate"].update(n_ctx=8, batch_size=4)
    params["structure"].update(
        contexts_per_source=12, n_words=120, words_per_prefix=4, icl_examples=2, ks=[1, 2],
        n_bootstrap=50,
    )  # fmt: skip
    params["tracking"].update(tracking_uri=tracking_uri)
    return params


@pytest.fixture(scope="module")
def tiny_corpus_module(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The documents of ``tiny_corpus``, written once per test module (for module-scoped
    fixtures that run the pipeline once and share its outputs)."""
    return tiny_corpus.__wrapped__(tmp_path_factory.mktemp("corpus-module"))


@pytest.fixture(scope="session")
def make_tiny_params():
    """The :func:`tiny_params` helper, for test modules (which cannot import conftest)."""
    return tiny_params


@pytest.fixture(scope="module")
def one_thread_module():
    """torch on one thread for the module, restored afterwards: tiny matmuls run as fast on one
    thread, and far faster on a machine shared with others."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
