"""export.py: SAELens-format export (cfg.json keys, tensors) and read-back with identical
outputs for every exportable variant; Switch refused with a clear error."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saelab.cli import main
from saelab.export import ExportError, export_saelens, load_saelens
from saelab.sae import build_sae

REPO = Path(__file__).resolve().parents[1]
HPARAMS = yaml.safe_load((REPO / "params.yaml").read_text())["variant_params"]
D_IN, D_SAE, K = 16, 64, 4
EXPORTABLE = {"topk": "topk", "batchtopk": "jumprelu", "sampled": "jumprelu",
              "jumprelu": "jumprelu", "relu": "standard"}  # fmt: skip
METADATA = {"model": "smollm2", "hookpoint": "blocks.15.hook_resid_pre", "context_size": 128,
            "exclude_first_position": True, "max_norm": 12.5}  # fmt: skip


def _trained_like(variant: str):
    """A random SAE of ``variant`` with nonzero biases, thresholds that matter (BatchTopK θ 0.2,
    JumpReLU θ_i in [0.05, 0.5]) and a folded input scale, as a trained one is saved."""
    g = torch.Generator().manual_seed(0)
    sae = build_sae(variant, D_IN, D_SAE, K, HPARAMS[variant], g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        if variant in ("batchtopk", "sampled"):
            sae.activation.threshold.fill_(0.2)
        if variant == "jumprelu":
            theta = 0.05 + 0.45 * torch.rand(D_SAE, generator=g)
            sae.activation.log_threshold.copy_(theta.log())
        sae.fold_input_scale_(0.25)
    sae.metadata = dict(METADATA)
    return sae.eval()


@pytest.mark.parametrize("variant", EXPORTABLE)
def test_export_reloads_with_identical_outputs(tmp_path: Path, variant: str) -> None:
    """export -> load_saelens gives the same codes and reconstruction on random inputs (the
    SAELens SAE computes the same functions: module docstring of saelab.export)."""
    sae = _trained_like(variant)
    export_saelens(sae, tmp_path / "out")
    back = load_saelens(tmp_path / "out")
    x = 4 * torch.randn(256, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = sae(x), back(x)
    assert (want.acts > 0).float().sum(1).mean() > 0  # something fires
    assert torch.equal(want.acts > 0, got.acts > 0)
    torch.testing.assert_close(got.acts, want.acts, rtol=0, atol=0)
    torch.testing.assert_close(got.recon, want.recon, rtol=0, atol=0)
    assert back.metadata == METADATA


@pytest.mark.parametrize("variant", EXPORTABLE)
def test_export_files_follow_saelens(tmp_path: Path, variant: str) -> None:
    """cfg.json names the SAELens architecture, the shapes, no input normalisation, the
    TransformerLens hook name and its layer; the safetensors hold W_enc [d_in, d_sae],
    W_dec [d_sae, d_in], b_enc, b_dec, and threshold [d_sae] for jumprelu only; topk has k."""
    export_saelens(_trained_like(variant), tmp_path, model_name="HuggingFaceTB/SmolLM2-135M")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    arch = EXPORTABLE[variant]
    assert cfg["architecture"] == arch
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.15.hook_resid_pre" and meta["hook_layer"] == 15
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M" and meta["context_size"] == 128
    assert meta["seqpos_slice"] == [1, None]
    assert cfg.get("k") == (K if arch == "topk" else None)
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    expected = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)}
    if arch == "jumprelu":
        expected["threshold"] = (D_SAE,)
    assert shapes == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_batchtopk_threshold_is_the_global_theta_broadcast(tmp_path: Path) -> None:
    """BatchTopK's one θ (0.2, in raw units after folding: thresholds live in pre-activation
    units, which folding leaves unchanged) becomes a threshold vector of 0.2 everywhere."""
    export_saelens(_trained_like("batchtopk"), tmp_path)
    threshold = load_file(str(tmp_path / "sae_weights.safetensors"))["threshold"]
    assert torch.equal(threshold, torch.full((D_SAE,), 0.2))


def test_switch_export_is_refused(tmp_path: Path) -> None:
    """A Switch SAE has no SAELens architecture: ExportError naming it, nothing written."""
    sae = build_sae("switch", D_IN, D_SAE, K, HPARAMS["switch"])
    with pytest.raises(ExportError, match="switch SAE has no SAELens architecture"):
        export_saelens(sae, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_writes_and_refuses_switch(tmp_path: Path, capsys, monkeypatch) -> None:
    """`saelab export --sae DIR --out OUT` writes the two SAELens files; for a Switch SAE it
    exits 1 with one error line and leaves no output directory."""
    monkeypatch.setattr("saelab.cli._setup_logging", lambda: None)  # keep pytest's logging
    monkeypatch.setattr("saelab.cli.signal.signal", lambda *args: None)  # keep the handler
    _trained_like("topk").save(tmp_path / "topk", METADATA)
    main(["export", "--sae", str(tmp_path / "topk"), "--out", str(tmp_path / "exp")])
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    build_sae("switch", D_IN, D_SAE, K, HPARAMS["switch"]).save(tmp_path / "switch", METADATA)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--sae", str(tmp_path / "switch"), "--out", str(tmp_path / "sw")])
    assert exit_info.value.code == 1
    assert "no SAELens architecture" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "switch", "topk"]
