"""Several hookpoints from one LM pass (issue 14, part 3, library side): capture_resids returns
what one capture_resid per hookpoint returns, from one forward that stops at the deepest
hookpoint, and cache_split_hookpoints writes the stores of one cache_split per hookpoint."""

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
