"""saelab's exports in the real SAELens and sparsify: every exportable variant is written by
saelab.export, loaded by ``SAE.load_from_disk`` (SAELens) or ``SparseCoder.load_from_disk``
(sparsify) in the separate virtual environment .venv-interop (scripts/setup_interop.sh; their
dependencies never enter saelab's .venv), run on the same inputs, and compared here: the same
active latents (but a pre-activation within float32 rounding of its rule's boundary, which
either side may round across), the same codes and reconstruction (to float32 rounding: SAELens
computes the same matmuls in its own order), every metadata field as written, and the
sink-rule splice of saelab.sink_rule applied to the SAELens SAE equal to the evaluation's.

Skipped when .venv-interop is absent (run scripts/setup_interop.sh), except under CI
(.ci/run makes it), where its absence fails."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from saelab.capture import splice_fn
from saelab.export import ModelRef, export_saelens, export_sparsify, saelens_metadata
from saelab.sae import build_sae

REPO = Path(__file__).resolve().parents[1]
PYTHON = Path(os.environ.get("SAELAB_INTEROP_PYTHON", REPO / ".venv-interop" / "bin" / "python"))
HPARAMS = yaml.safe_load((REPO / "params.yaml").read_text())["variant_params"]
D_IN, D_SAE, K = 64, 512, 16
EXPORTABLE = {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "sampled": "JumpReLUSAE",
              "jumprelu": "JumpReLUSAE", "relu": "StandardSAE",
              "matryoshka": "JumpReLUSAE"}  # fmt: skip
MODEL = ModelRef(
    "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", "float32"
)
MAX_NORM = 60.0
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 rounding of a 64 x 512 matmul in another order
EDGE = 1e-5  # a pre-activation this close to its rule's boundary may fall either side by rounding


def _python() -> Path:
    if not PYTHON.exists():
        reason = f"no {PYTHON} (run scripts/setup_interop.sh: SAELens and sparsify, kept apart)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return PYTHON


def _trained_like(variant: str):
    """A random SAE of ``variant`` with nonzero biases, thresholds that matter and a folded
    input scale, as a trained one is saved, with the metadata of the pipeline's SAEs."""
    g = torch.Generator().manual_seed(0)
    sae = build_sae(variant, D_IN, D_SAE, K, HPARAMS[variant], g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        if variant in ("batchtopk", "sampled", "matryoshka"):
            sae.activation.threshold.fill_(0.3)
        if variant == "jumprelu":
            sae.activation.log_threshold.copy_((0.05 + 0.5 * torch.rand(D_SAE, generator=g)).log())
        sae.fold_input_scale_(0.25)
    sae.metadata = {"model": "../shared/data/models/smollm2-135m-instruct",
                    "gguf_file": MODEL.gguf_file, "model_dtype": "float32",
                    "hookpoint": "blocks.15.hook_resid_pre", "context_size": 16,
                    "exclude_first_position": True, "max_norm": MAX_NORM}  # fmt: skip
    return sae.eval()


def _inputs() -> dict[str, torch.Tensor]:
    """``x`` [512, D_IN] tokens; ``resid`` [4, 16, D_IN] contexts with position 0 and two later
    tokens above MAX_NORM (sinks)."""
    g = torch.Generator().manual_seed(1)
    resid = 4 * torch.randn(4, 16, D_IN, generator=g)
    resid[:, 0] *= 20
    resid[0, 7] *= 20
    resid[2, 3] *= 20
    return {"x": 4 * torch.randn(512, D_IN, generator=g), "resid": resid}


def _boundary(sae, pre: torch.Tensor) -> torch.Tensor:
    """[n, d_sae] the value where each latent's rule switches it on: θ (per latent) for the
    threshold rules, 0 for ReLU, the row's k-th largest pre-activation for TopK."""
    act = sae.activation
    if sae.variant == "topk":
        return pre.topk(act.k, dim=-1).values[:, -1:].expand_as(pre)
    if sae.variant == "jumprelu":
        return act.log_threshold.exp().expand_as(pre)
    if sae.variant in ("batchtopk", "sampled", "matryoshka"):
        return act.threshold.expand_as(pre)
    return torch.zeros_like(pre)


def _assert_same_codes(sae, x: torch.Tensor, acts: torch.Tensor, recon: torch.Tensor) -> None:
    """``acts``/``recon`` of another library equal ours: the same active latents but where a
    pre-activation lies within EDGE of its rule's boundary (either side is right to float32
    rounding; at most 1% of tokens), and, on every token without such a flip, the same codes
    and reconstruction to TOL."""
    with torch.no_grad():
        want, pre = sae(x), sae.encode_pre(x)
    assert 0 < (want.acts > 0).float().sum(1).mean() < sae.d_sae  # sparse, and something fires
    flipped = (acts > 0) != (want.acts > 0)
    assert ((pre - _boundary(sae, pre)).abs()[flipped] < EDGE).all()
    same = ~flipped.any(-1)
    assert same.float().mean() >= 0.99
    torch.testing.assert_close(acts[same], want.acts[same], **TOL)
    torch.testing.assert_close(recon[same], want.recon[same], **TOL)


@pytest.fixture(scope="module")
def interop(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Export every variant, run scripts/interop_check.py in .venv-interop once for all."""
    python = _python()
    root = tmp_path_factory.mktemp("interop")
    saes = {v: _trained_like(v) for v in EXPORTABLE}
    for variant, sae in saes.items():
        export_saelens(sae, root / "saelens" / variant, MODEL)
    export_sparsify(saes["topk"], root / "sparsify" / "topk", MODEL)
    inputs = _inputs()
    save_file(inputs, str(root / "inputs.safetensors"))
    cmd = [str(python), str(REPO / "scripts" / "interop_check.py"),
           "--saelens", *[str(root / "saelens" / v) for v in EXPORTABLE],
           "--sparsify", str(root / "sparsify" / "topk"),
           "--inputs", str(root / "inputs.safetensors"), "--saelab-src", str(REPO / "src"),
           "--out", str(root / "out")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return {
        "saes": saes,
        "inputs": inputs,
        "outputs": load_file(str(root / "out" / "outputs.safetensors")),
        "report": json.loads((root / "out" / "report.json").read_text()),
    }


def test_the_interop_venv_is_not_ours(interop: dict) -> None:
    """The libraries ran in their own environment, at the pinned versions; saelab's .venv has
    neither (their dependencies never enter ours)."""
    versions = interop["report"]["versions"]
    assert (versions["sae-lens"], versions["eai-sparsify"]) == ("6.54.12", "1.3.3")
    from importlib.util import find_spec

    assert find_spec("sae_lens") is None and find_spec("sparsify") is None


@pytest.mark.parametrize("variant", EXPORTABLE)
def test_saelens_reconstructs_as_saelab(interop: dict, variant: str) -> None:
    """SAELens's SAE of the export: the class of its architecture; on the same tokens the same
    active latents, codes and reconstruction (encode/decode and its forward)."""
    sae, x, out = interop["saes"][variant], interop["inputs"]["x"], interop["outputs"]
    assert interop["report"]["saelens"][variant]["class"] == EXPORTABLE[variant]
    acts = out[f"saelens/{variant}/acts"]
    _assert_same_codes(sae, x, acts, out[f"saelens/{variant}/recon"])
    _assert_same_codes(sae, x, acts, out[f"saelens/{variant}/forward"])


@pytest.mark.parametrize("variant", EXPORTABLE)
def test_saelens_keeps_every_metadata_field(interop: dict, variant: str) -> None:
    """``sae.cfg.metadata`` after ``load_from_disk`` is the metadata written, every field:
    model hub id, GGUF file, dtype, hook, sink rule, max_norm and saelab's block."""
    loaded = interop["report"]["saelens"][variant]["metadata"]
    written = json.loads(json.dumps(saelens_metadata(interop["saes"][variant], MODEL)))
    assert loaded == written
    assert loaded["model_name"] == MODEL.hub_id and loaded["saelab_max_norm"] == MAX_NORM


@pytest.mark.parametrize("variant", EXPORTABLE)
def test_sink_rule_hook_in_saelens_splices_as_the_evaluation(interop: dict, variant: str) -> None:
    """saelab.sink_rule.saelens_hook on the SAELens SAE, from its loaded metadata alone, gives
    the evaluation's splice (saelab.capture.splice_fn): position 0 and the two planted sinks
    unchanged, every other token SAELens's reconstruction."""
    sae, resid = interop["saes"][variant], interop["inputs"]["resid"]
    with torch.no_grad():
        want = splice_fn(lambda t: sae(t).recon, True, MAX_NORM)(resid)
        pre = sae.encode_pre(resid.reshape(-1, D_IN))
    edge = ((pre - _boundary(sae, pre)).abs() < EDGE).any(-1).reshape(resid.shape[:2])
    got = interop["outputs"][f"saelens/{variant}/spliced"]
    torch.testing.assert_close(got[~edge], want[~edge], **TOL)  # as _assert_same_codes
    unchanged = (got == resid).all(-1)
    assert unchanged[:, 0].all() and unchanged[0, 7] and unchanged[2, 3]
    assert int(unchanged.sum()) == resid.shape[0] + 2


def test_sparsify_reconstructs_as_saelab(interop: dict) -> None:
    """sparsify's SparseCoder of the TopK export (hookpoint layers.14, k kept): the same top-k
    latents, codes and reconstruction as our TopK SAE."""
    sae, x, out = interop["saes"]["topk"], interop["inputs"]["x"], interop["outputs"]
    info = interop["report"]["sparsify"]["topk"]
    assert (info["class"], info["hookpoint"], info["k"]) == ("SparseCoder", "layers.14", K)
    acts = out["sparsify/topk/acts"]
    _assert_same_codes(sae, x, acts, out["sparsify/topk/recon"])
    _assert_same_codes(sae, x, acts, out["sparsify/topk/forward"])
