"""export.py: SAELens-format export (cfg.json keys, tensors, metadata that SAELens keeps) and
read-back with identical outputs for every exportable variant; the model's hub id; sparsify's
format; Switch refused with a clear error. sink_rule.py: the splice rule equals the evaluation's.
(Loading the exports in the real SAELens and sparsify: tests/test_interop.py.)"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saelab.capture import splice_fn
from saelab.cli import main
from saelab.config import load_params
from saelab.export import (
    ExportError,
    ModelRef,
    export_saelens,
    export_sparsify,
    load_saelens,
    model_ref,
    sparsify_hookpoint,
)
from saelab.sae import build_sae
from saelab.sink_rule import rule_of, saelens_hook, splice_with_sink_rule

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
    model = ModelRef("HuggingFaceTB/SmolLM2-135M", "m.Q4_1.gguf", "float32")
    export_saelens(_trained_like(variant), tmp_path, model)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    arch = EXPORTABLE[variant]
    assert cfg["architecture"] == arch
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.15.hook_resid_pre" and meta["hook_layer"] == 15
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M" and meta["context_size"] == 128
    assert meta["seqpos_slice"] == [1, None]
    assert (meta["model_gguf_file"], meta["model_dtype"]) == ("m.Q4_1.gguf", "float32")
    assert "saelab" not in cfg  # a top-level key of its own is dropped by SAELens at load
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


def test_metadata_carries_sink_rule_and_saelab_block(tmp_path: Path) -> None:
    """Everything needed to reproduce the numbers is in cfg.json's ``metadata`` (the one place
    SAELens keeps any key): max_norm, the sink rule in words, and saelab's variant, k, hparams
    and the SAE's own metadata."""
    sae = _trained_like("jumprelu")
    export_saelens(sae, tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert meta["saelab_max_norm"] == 12.5
    rule = meta["saelab_sink_rule"]
    assert "saelab_max_norm" in rule and "position 0" in rule
    assert meta["saelab"]["variant"] == "jumprelu" and meta["saelab"]["k"] == K
    assert meta["saelab"]["hparams"] == sae.hparams()
    assert meta["saelab"]["metadata"] == METADATA
    assert meta["model_name"] == "smollm2"  # METADATA's model is not a local path: a hub name
    assert rule_of(meta) == (12.5, True)


def _cfg(tmp_path: Path, **export):
    """params.yaml's config with export.hub_id as given."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["export"].update(export)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def test_model_ref_takes_the_hub_id_from_params_only_for_the_same_model(tmp_path: Path) -> None:
    """--model-name wins; else params' export.hub_id, when params' model (recorded path and GGUF
    file) is the SAE's; a local model without a hub id is refused with a line saying what to do;
    the dtype comes from the SAE's metadata, else from the matching params."""
    cfg = _cfg(tmp_path, hub_id="org/model")
    meta = {"model": "../shared/data/models/smollm2-135m-instruct",
            "gguf_file": cfg.model.gguf_file}  # fmt: skip
    assert model_ref(meta, cfg) == ModelRef("org/model", cfg.model.gguf_file, cfg.model.dtype)
    assert model_ref({**meta, "model_dtype": "bfloat16"}, cfg).dtype == "bfloat16"
    assert model_ref(meta, cfg, "me/mine").hub_id == "me/mine"
    other = {**meta, "gguf_file": "other.gguf"}
    with pytest.raises(ExportError, match="local directory without a hub id: set export.hub_id"):
        model_ref(other, cfg)
    assert model_ref({"model": "HuggingFaceTB/SmolLM2-135M"}).hub_id == "HuggingFaceTB/SmolLM2-135M"


def test_model_ref_reads_the_local_config_name(tmp_path: Path) -> None:
    """A local model directory whose config.json names its hub id (as save_pretrained of a hub
    model writes ``_name_or_path``) gives that id; one without gives none."""
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ExportError, match="without a hub id"):
        model_ref({"model": str(model)})
    (model / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    assert model_ref({"model": str(model)}).hub_id == "HuggingFaceTB/SmolLM2-135M"


def test_export_hub_id_is_validated(tmp_path: Path) -> None:
    """export.hub_id must be null or a hub id: one line naming the key."""
    from saelab.config import ConfigError

    with pytest.raises(ConfigError, match=r"params: export.hub_id must be null or a hub id"):
        _cfg(tmp_path, hub_id="../local/path")


def test_sparsify_export_matches_its_topk_rule(tmp_path: Path) -> None:
    """sparsify's files: cfg.json (its SparseCoderConfig fields + d_in), sae.safetensors with
    encoder.weight [d_sae, d_in], encoder.bias, W_dec, b_dec, and saelab.json (the metadata).
    sparsify's rule computed from them in plain torch (relu((x - b_dec) W^T + b), the k
    largest, decoded) gives our TopK reconstruction."""
    sae = _trained_like("topk")
    target = export_sparsify(sae, tmp_path)
    assert target == tmp_path / "layers.14"  # blocks.15.hook_resid_pre = output of layer 14
    cfg = json.loads((target / "cfg.json").read_text())
    assert (cfg["activation"], cfg["k"], cfg["d_in"]) == ("topk", K, D_IN)
    assert cfg["num_latents"] == D_SAE
    assert cfg["transcode"] is False and cfg["skip_connection"] is False
    assert json.loads((target / "saelab.json").read_text())["saelab_max_norm"] == 12.5
    t = load_file(str(target / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "encoder.weight": (D_SAE, D_IN), "encoder.bias": (D_SAE,),
        "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,),
    }  # fmt: skip
    x = 4 * torch.randn(256, D_IN, generator=torch.Generator().manual_seed(1))
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    values, indices = pre.topk(cfg["k"], dim=-1)
    recon = torch.zeros_like(pre).scatter_(-1, indices, values) @ t["W_dec"] + t["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(recon, sae(x).recon, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["batchtopk", "jumprelu", "relu", "sampled"])
def test_sparsify_refuses_other_rules(tmp_path: Path, variant: str) -> None:
    with pytest.raises(ExportError, match=f"a {variant} SAE has no sparsify equivalent"):
        export_sparsify(_trained_like(variant), tmp_path)


def test_sparsify_hookpoints() -> None:
    """resid_pre of layer L is the output of module layers.L-1 (embed_tokens for L = 0)."""
    assert sparsify_hookpoint("blocks.15.hook_resid_pre") == "layers.14"
    assert sparsify_hookpoint("blocks.0.hook_resid_pre") == "embed_tokens"
    assert sparsify_hookpoint("blocks.3.hook_resid_post") == "layers.3"
    with pytest.raises(ExportError, match="is not blocks"):
        sparsify_hookpoint("transformer.h.3")


def _resid_with_sinks() -> torch.Tensor:
    """[4, 16, D_IN] float32 with position 0 huge and two later sinks (norm > 12.5) planted."""
    resid = torch.randn(4, 16, D_IN, generator=torch.Generator().manual_seed(2))
    resid[:, 0] *= 50
    resid[1, 5] *= 40
    resid[3, 9] *= 40
    return resid


def test_sink_rule_splice_is_the_evaluations(tmp_path: Path) -> None:
    """splice_with_sink_rule with an export's metadata (via saelens_hook, on an object shaped
    like a SAELens SAE) equals saelab.capture.splice_fn, which the evaluation splices with:
    position 0 and the planted sinks unchanged, every other token reconstructed."""
    sae = _trained_like("topk")
    export_saelens(sae, tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    resid = _resid_with_sinks()

    def recon(t: torch.Tensor) -> torch.Tensor:
        return sae(t).recon

    class LikeSAELens:  # sae(x) -> reconstruction; sae.cfg.metadata: the export's metadata
        cfg = type("Cfg", (), {"metadata": meta})

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return recon(x)

    with torch.no_grad():
        want = splice_fn(recon, True, 12.5)(resid)
        got = saelens_hook(LikeSAELens())(resid, None)
        plain = splice_with_sink_rule(resid, recon, 12.5, exclude_first_position=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(plain, want, rtol=0, atol=0)
    unchanged = (got == resid).all(-1)
    assert unchanged[:, 0].all() and unchanged[1, 5] and unchanged[3, 9]
    assert int(unchanged.sum()) == 4 + 2


def test_sink_rule_needs_saelab_metadata() -> None:
    with pytest.raises(KeyError, match="not an export of saelab"):
        rule_of({"seqpos_slice": [1, None]})


def test_cli_export_names_the_hub_id_from_params_and_writes_sparsify(
    tmp_path: Path, monkeypatch
) -> None:
    """`saelab export --params params.yaml` writes params' export.hub_id as model_name for an SAE
    of params' model; `--format sparsify` writes <out>/layers.14/ with sparsify's two files."""
    from saelab.config import recorded_path

    monkeypatch.setattr("saelab.cli._setup_logging", lambda: None)
    monkeypatch.setattr("saelab.cli.signal.signal", lambda *args: None)
    cfg = load_params(REPO / "params.yaml")
    meta = {**METADATA, "model": recorded_path(cfg.model.name_or_path),
            "gguf_file": cfg.model.gguf_file}  # fmt: skip
    _trained_like("topk").save(tmp_path / "topk", meta)
    params = ["--params", str(REPO / "params.yaml")]
    main(["export", "--sae", str(tmp_path / "topk"), "--out", str(tmp_path / "sl"), *params])
    exported = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert exported["model_name"] == cfg.export.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert exported["model_gguf_file"] == cfg.model.gguf_file
    main(["export", "--sae", str(tmp_path / "topk"), "--out", str(tmp_path / "sp"), *params,
          "--format", "sparsify"])  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "sp" / "layers.14").iterdir())
    assert files == ["cfg.json", "sae.safetensors", "saelab.json"]


def test_cli_export_refuses_params_or_model_name_of_another_model(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """An explicit --params whose hookpoint is not the SAE's, and a --model-name that is not the
    hub id the SAE recorded, each end the export with one line naming both sides (exit 2) and
    write nothing. The default ./params.yaml is not checked: it lends its hub id to an SAE of its
    model (any hookpoint)."""
    from saelab.config import recorded_path

    monkeypatch.setattr("saelab.cli._setup_logging", lambda: None)
    monkeypatch.setattr("saelab.cli.signal.signal", lambda *args: None)
    cfg = load_params(REPO / "params.yaml")
    meta = {**METADATA, "model": recorded_path(cfg.model.name_or_path),
            "gguf_file": cfg.model.gguf_file, "hookpoint": "blocks.3.hook_resid_pre"}  # fmt: skip
    _trained_like("topk").save(tmp_path / "local", meta)
    _trained_like("topk").save(tmp_path / "hub", {**METADATA, "model": "org/model"})
    cases = [
        (["--sae", str(tmp_path / "local"), "--params", str(REPO / "params.yaml")],
         f"params model.hookpoint is {cfg.model.hookpoint!r} but "
         f"{tmp_path / 'local' / 'cfg.json'}'s hookpoint is 'blocks.3.hook_resid_pre'"),
        (["--sae", str(tmp_path / "hub"), "--model-name", "org/other"],
         f"--model-name is 'org/other' but {tmp_path / 'hub' / 'cfg.json'}'s model is "
         "'org/model'"),
    ]  # fmt: skip
    for args, line in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", *args, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == f"saelab: error: {line}"
        assert not (tmp_path / "out").exists()
    monkeypatch.chdir(REPO)  # the default ./params.yaml: its model's hub id, no hookpoint check
    main(["export", "--sae", str(tmp_path / "local"), "--out", str(tmp_path / "out")])
    exported = json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]
    assert exported["model_name"] == cfg.export.hub_id
    assert exported["hook_name"] == "blocks.3.hook_resid_pre"


def test_load_saelens_reads_an_export_from_before_the_move(tmp_path: Path) -> None:
    """An export written before saelab's block moved into ``metadata`` (top-level ``saelab``)
    still reads back with its metadata."""
    export_saelens(_trained_like("batchtopk"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["saelab"] = cfg["metadata"].pop("saelab")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back = load_saelens(tmp_path)
    assert back.metadata == METADATA and back.activation.k == K
