"""Several hookpoints from one LM pass (issue 14, part 3): capture_resids returns what one
capture_resid per hookpoint returns, from one forward that stops at the deepest hookpoint,
cache_split_hookpoints writes the stores of one cache_split per hookpoint, and the cache stage's
cache_activations writes model.extra_hookpoints' stores beside model.hookpoint's (and, with none,
runs the one-hookpoint path). The DVC stages: tests/test_pipeline_hookpoints.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from saelab.cache import cache_split, cache_split_hookpoints
from saelab.capture import capture_resid, capture_resids, decoder_layers, load_model
from saelab.config import parse_params
from tests.model_config import cpu_model_config

CPU = torch.device("cpu")
# out of forward order, both sites, and resid_post of layer 1 = resid_pre of layer 2
HOOKPOINTS = ["blocks.2.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
              "blocks.1.hook_resid_pre"]  # fmt: skip


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tiny_llama_dir, tiny_gpt2_dir, one_thread_module):
    model_dir = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    cfg = cpu_model_config(model_dir, HOOKPOINTS[0])
    return cfg, load_model(cfg, CPU)


def test_capture_resids_equals_one_capture_per_hookpoint(tiny) -> None:
    """Each tensor of capture_resids equals capture_resid of its hookpoint, bit for bit, in the
    order asked; layers after the deepest hookpoint (layer 2's input: layers 0 and 1 run) do
    not run; the resid_post of layer L is the resid_pre of layer L + 1."""
    cfg, model = tiny
    ids = torch.randint(1, 49152, (3, 16), generator=torch.Generator().manual_seed(0))
    cfgs = [cfg.model_copy(update={"hookpoint": h}) for h in HOOKPOINTS]
    ran: list[int] = []
    handles = [layer.register_forward_hook(lambda *_, i=i: ran.append(i))
               for i, layer in enumerate(decoder_layers(model))]  # fmt: skip
    try:
        got = capture_resids(model, cfgs, ids)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]
    for c, tensor in zip(cfgs, got, strict=True):
        assert torch.equal(tensor, capture_resid(model, c, ids)), c.hookpoint
    assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[3])  # the same tensors
    assert not torch.equal(got[1], got[2])  # layer 1 ran in between
    with pytest.raises(ValueError, match="distinct"):
        capture_resids(model, cfgs[:2] * 2, ids)


def _blank_timing(path: Path) -> str:
    return re.sub(r'"tokens_per_s": [0-9.e+-]+', '"tokens_per_s": T', path.read_text())


def test_cache_split_hookpoints_writes_the_store_of_each_hookpoint(
    tmp_path, tiny_llama_dir, make_tiny_params, one_thread_module
) -> None:
    """One pass over 70 contexts (3 chunks, the last partial) for three hookpoints writes,
    per hookpoint, the bytes of cache_split with model.hookpoint set to it (zarr.json up to the
    tokens_per_s value): same rows, same attributes (each store names its own hookpoint)."""
    (tmp_path / "corpus").mkdir()
    params = make_tiny_params(tiny_llama_dir, [str(tmp_path / "corpus")], None)
    params["cache"].update(batch_size=3, chunk_tokens=1024)
    cfg = parse_params(yaml.safe_load(yaml.safe_dump(params)))
    model = load_model(cfg.model, CPU)
    contexts = np.random.default_rng(1).integers(0, 49152, (70, 32), dtype=np.int32)
    hookpoints = HOOKPOINTS[:3]
    outs = [tmp_path / f"multi-{i}" for i in range(3)]
    cache_split_hookpoints(model, cfg, hookpoints, contexts, outs, "tokens:train", "bfloat16")
    for hookpoint, out in zip(hookpoints, outs, strict=True):
        one = cfg.model_copy(
            update={"model": cfg.model.model_copy(update={"hookpoint": hookpoint})}
        )
        ref = tmp_path / f"one-{out.name}"
        cache_split(model, one, contexts, ref, "tokens:train", "bfloat16")
        files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        assert len(files) == 4  # zarr.json + 3 chunks
        for rel in files:
            if rel.name == "zarr.json":
                assert _blank_timing(ref / rel) == _blank_timing(out / rel)
                assert f'"hookpoint": "{hookpoint}"' in (out / rel).read_text()
            else:
                assert (ref / rel).read_bytes() == (out / rel).read_bytes(), (hookpoint, rel)
    with pytest.raises(ValueError, match="2 hookpoints but 1"):
        cache_split_hookpoints(model, cfg, hookpoints[:2], contexts, outs[:1], "t", None)


def _files(root: Path) -> dict[str, str | bytes]:
    """Every file under ``root`` by relative path: zarr.json as text with tokens_per_s blanked
    (a wall-clock rate), chunks as bytes."""
    return {
        str(p.relative_to(root)): _blank_timing(p) if p.name == "zarr.json" else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cache_setup(tmp_path_factory, tiny_llama_dir, make_tiny_params, one_thread_module):
    """A token group (40 train, 12 eval contexts of 32 tokens), the tiny Llama and its params
    (primary hookpoint blocks.2.hook_resid_pre, chunks of 1,024 tokens: several per store)."""
    from saelab.data import write_tokens

    root = tmp_path_factory.mktemp("cache-activations")
    (root / "corpus").mkdir()
    params = make_tiny_params(tiny_llama_dir, [str(root / "corpus")], None)
    params["cache"].update(batch_size=3, chunk_tokens=1024, max_eval_tokens=None)
    cfg = parse_params(yaml.safe_load(yaml.safe_dump(params)))
    rng = np.random.default_rng(2)
    sizes = {"train": 40, "eval": 12}
    splits = {s: rng.integers(0, 49152, (n, 32), dtype=np.int32) for s, n in sizes.items()}
    write_tokens(root / "tokens", splits, {})
    return root, cfg, load_model(cfg.model, CPU)


def _with_extras(cfg, hookpoint: str, extras: tuple[str, ...]):
    model = cfg.model.model_copy(update={"hookpoint": hookpoint, "extra_hookpoints": extras})
    return cfg.model_copy(update={"model": model})


def test_cache_activations_with_extra_hookpoints_writes_each_ones_stores(cache_setup) -> None:
    """With model.extra_hookpoints, <out>/{train,eval} hold what the cache of model.hookpoint
    alone writes and <hookpoints_out>/<h>/{train,eval} what the cache of h alone writes (same
    files, same bytes; zarr.json up to tokens_per_s), from one pass per batch."""
    from saelab.cache import cache_activations

    root, cfg, model = cache_setup
    tokens, primary, extras = str(root / "tokens"), cfg.model.hookpoint, HOOKPOINTS[1:3]
    cache_activations(model, _with_extras(cfg, primary, extras), tokens, root / "acts",
                      root / "extras")  # fmt: skip
    assert sorted(p.name for p in (root / "extras").iterdir()) == sorted(extras)
    for hookpoint, got in [(primary, root / "acts"), *((h, root / "extras" / h) for h in extras)]:
        alone = root / f"alone-{hookpoint}"
        cache_activations(model, _with_extras(cfg, hookpoint, ()), tokens, alone)
        want = _files(alone)
        assert {p.split("/")[0] for p in want} == {"train", "eval"}
        assert len(want) > 4  # zarr.json + chunks, per split
        assert _files(got) == want, hookpoint


def test_cache_activations_without_extras_runs_todays_path(cache_setup, monkeypatch) -> None:
    """model.extra_hookpoints: [] caches through cache_split alone (the path of the pipeline of
    one hookpoint, never the several-hookpoint pass) and writes hookpoints_out as an empty
    directory (the cache stage's output for DVC); extra hookpoints need hookpoints_out."""
    import saelab.cache
    from saelab.cache import cache_activations
    from saelab.config import ConfigError

    root, cfg, model = cache_setup

    def refuse(*args, **kwargs):
        raise AssertionError("cache_split_hookpoints called without extra hookpoints")

    monkeypatch.setattr(saelab.cache, "cache_split_hookpoints", refuse)
    out, extras = root / "plain" / "acts", root / "plain" / "extras"
    cache_activations(model, cfg, str(root / "tokens"), out, extras)
    assert sorted(p.name for p in out.iterdir()) == ["eval", "train"]
    assert extras.is_dir() and not any(extras.iterdir())
    with pytest.raises(ConfigError, match=r"^params: model\.extra_hookpoints needs saelab cache "):
        cache_activations(model, _with_extras(cfg, cfg.model.hookpoint, HOOKPOINTS[1:2]),
                          str(root / "tokens"), root / "no-extras-dir")  # fmt: skip
    assert not (root / "no-extras-dir").exists()


def test_cache_activations_interrupted_leaves_neither_directory(cache_setup, monkeypatch) -> None:
    """An interrupt in the eval split's pass (after the train stores are written) removes both
    temporary directories: neither <out> nor <hookpoints_out> exists, nor a sibling of them."""
    import saelab.cache
    from saelab.cache import cache_activations

    root, cfg, model = cache_setup
    real = saelab.cache.cache_split_hookpoints

    def interrupt_eval(model, cfg, hookpoints, contexts, outs, source, dtype=None):
        if source.endswith(":eval"):
            raise KeyboardInterrupt
        real(model, cfg, hookpoints, contexts, outs, source, dtype)

    monkeypatch.setattr(saelab.cache, "cache_split_hookpoints", interrupt_eval)
    parent = root / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, _with_extras(cfg, cfg.model.hookpoint, HOOKPOINTS[1:2]),
                          str(root / "tokens"), parent / "acts", parent / "extras")  # fmt: skip
    assert list(parent.iterdir()) == []
