"""cli.py: every stage command end to end on tiny random models (in-process, outputs checked),
and bad params stopping a command with one stderr line naming the key, before any output."""

import copy
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

import saelab.train
from saelab.cli import main
from saelab.data import read_token_attrs, read_tokens
from saelab.sae import SparseAutoencoder
from saelab.store import ActivationStore

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("topk", "batchtopk")
CTX_LEN, D_IN, D_SAE, K = 32, 64, 128, 8  # what tiny_params and the tiny models set
SPLITS = ("train", "eval")


def run_cli(*args: str | Path) -> None:
    """``saelab.cli.main`` in-process; the root logger and the SIGTERM handler (which the CLI
    sets) are restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        main([str(a) for a in args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        signal.signal(signal.SIGTERM, sigterm)


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models run as fast on one thread, and far faster on a machine shared with others."""


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama_dir, tiny_corpus_module, make_tiny_params) -> Path:
    """prepare -> cache -> train -> evaluate (both variants) on the tiny Llama, once; the
    directory holds params.yaml, data/, models/, metrics/ and mlflow.db as DVC would lay them."""
    root = tmp_path_factory.mktemp("cli-llama")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tiny = make_tiny_params(tiny_llama_dir, tiny_corpus_module, uri)
    tiny["variants"] = list(VARIANTS)
    params = write_params(root / "params.yaml", tiny)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
            mp.delenv(var, raising=False)
        mp.setenv("DVC_STAGE", "test")  # as DVC runs the stages: runs nest under the pipeline's
        run_cli("prepare", "--params", params, "--out", "data/tokens")
        run_cli("cache", "--params", params, "--tokens", "data/tokens", "--out", "data/activations")
        for v in VARIANTS:
            run_cli(
                "train", "--params", params, "--variant", v,
                "--activations", "data/activations", "--out", f"models/{v}",
            )  # fmt: skip
        run_cli("baseline", "--params", params, "--tokens", "data/tokens",
                "--activations", "data/activations", "--out", "data/baseline")  # fmt: skip
        for v in VARIANTS:
            run_cli(
                "evaluate", "--params", params, "--variant", v, "--tokens", "data/tokens",
                "--activations", "data/activations", "--baseline", "data/baseline",
                "--sae", f"models/{v}", "--out", f"metrics/{v}.json",
                "--hist", f"plots/hist/{v}.json", "--per-context", f"data/per_context/{v}.npz",
            )  # fmt: skip
        run_cli("summarize", "--params", params, "--metrics", "metrics", "--hist", "plots/hist",
                "--per-context", "data/per_context", "--out", "summary.json",
                "--plots", "plots")  # fmt: skip
    return root


def _variant_runs(client, experiment_id: str) -> list:
    """The per-variant MLflow runs of an experiment (not the pipeline parent runs)."""
    return [r for r in client.search_runs([experiment_id]) if "variant" in r.data.tags]


def _params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def _hidden_state(model_dir: Path, ids: np.ndarray, index: int) -> torch.Tensor:
    """hidden_states[index] of a full forward of the HF model on one context: [ctx_len, d_in]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False,
                    output_hidden_states=True)  # fmt: skip
    return out.hidden_states[index][0]


def _check_stores(root: Path, hookpoint: str) -> dict[str, ActivationStore]:
    """Each split's store holds whole contexts of that split's tokens, capped by the cache
    limits, with the hookpoint, ctx_len and d_in recorded in its attrs."""
    params = _params(root)
    limits = {
        "train": params["cache"]["max_train_tokens"],
        "eval": params["cache"]["max_eval_tokens"],
    }
    stores = {}
    for split in SPLITS:
        n_ctx = len(read_tokens(root / "data" / "tokens", split))
        store = ActivationStore(root / "data" / "activations" / split)
        assert store.attrs["hookpoint"] == hookpoint
        assert store.attrs["ctx_len"] == CTX_LEN
        assert store.attrs["d_in"] == D_IN
        assert store.attrs["n_tokens"] == min(n_ctx, limits[split] // CTX_LEN) * CTX_LEN
        dtype_key = "store_dtype" if split == "train" else "eval_store_dtype"
        assert store.attrs["dtype"] == params["cache"][dtype_key]
        stores[split] = store
    return stores


def test_prepare_writes_token_splits(llama_run: Path) -> None:
    """prepare writes a zarr group with int32 train and eval arrays of whole ctx_len contexts,
    whose attrs count them and list the held-out documents of every source."""
    group = zarr.open_group(str(llama_run / "data" / "tokens"), mode="r")
    assert sorted(group.array_keys()) == ["eval", "train"]
    attrs = read_token_attrs(llama_run / "data" / "tokens")
    assert attrs["ctx_len"] == CTX_LEN
    for split in SPLITS:
        tokens = read_tokens(llama_run / "data" / "tokens", split)
        assert tokens.dtype == np.int32 and tokens.ndim == 2 and tokens.shape[1] == CTX_LEN
        assert attrs["n_ctx"][split] == tokens.shape[0] >= 1
        assert 0 <= tokens.min() and tokens.max() < 49152
    assert sorted(attrs["docs_per_source"]["eval"]) == ["us-speeches", "wikitext-2"]


def test_cache_writes_hookpoint_activations(llama_run: Path, tiny_llama_dir: Path) -> None:
    """cache stores, row by row, the residual stream at blocks.2.hook_resid_pre (the Llama's
    hidden_states[2]) of the split's contexts in order, for both splits."""
    stores = _check_stores(llama_run, "blocks.2.hook_resid_pre")
    for split, store in stores.items():
        ids = read_tokens(llama_run / "data" / "tokens", split)[0]
        expected = _hidden_state(tiny_llama_dir, ids, 2)
        # stored as bfloat16: allow a one-ulp rounding difference (2^-7 relative)
        torch.testing.assert_close(store.read(0, CTX_LEN), expected, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_writes_loadable_sae(llama_run: Path, variant: str) -> None:
    """train writes sae.safetensors + cfg.json that load back as the variant with d_in 64,
    d_sae and k from params, recording the hookpoint and its MLflow run."""
    sae_dir = llama_run / "models" / variant
    assert sorted(p.name for p in sae_dir.iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert (cfg["variant"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == (variant, D_IN, D_SAE, K)
    assert cfg["metadata"]["hookpoint"] == "blocks.2.hook_resid_pre"
    assert cfg["metadata"]["mlflow_run_id"]
    sae = SparseAutoencoder.load(sae_dir)
    assert (sae.variant, sae.d_in, sae.d_sae) == (variant, D_IN, D_SAE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_evaluate_writes_finite_metrics(llama_run: Path, variant: str) -> None:
    """The metrics JSON names the variant and k and holds finite CE (clean, spliced,
    zero-ablated), CE loss recovered, FVU and L0; TopK's L0 is exactly k on every token."""
    metrics = json.loads((llama_run / "metrics" / f"{variant}.json").read_text())
    assert metrics["variant"] == variant and metrics["k"] == K
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_loss_recovered", "fvu", "l0"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["fvu"] and 0 < metrics["l0"] <= D_SAE
    if variant == "topk":
        assert metrics["l0"] == K
    else:
        assert metrics["l0_batch_mode"] == pytest.approx(K)
        assert metrics["threshold"] > 0


@pytest.mark.parametrize("variant", ["jumprelu", "sampled"])  # relu: as jumprelu, no θ
def test_new_variants_train_with_their_params_and_evaluate(
    llama_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """train builds the variant from its variant_params section, which cfg.json records so
    that load rebuilds it; evaluate writes finite metrics (Sampled: a positive threshold).
    Own MLflow store, so that the llama_run store keeps one run per variant."""
    params = _params(llama_run)
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    data = llama_run / "data"
    run_cli("train", "--params", path, "--variant", variant,
            "--activations", data / "activations", "--out", "sae")  # fmt: skip
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["variant"] == variant and cfg["k"] == K
    assert cfg["hparams"] == params["variant_params"][variant]
    sae = SparseAutoencoder.load(tmp_path / "sae")
    assert sae.activation.hparams() == params["variant_params"][variant]
    run_cli("evaluate", "--params", path, "--variant", variant, "--tokens", data / "tokens",
            "--activations", data / "activations", "--baseline", data / "baseline",
            "--sae", "sae", "--out", "m.json")  # fmt: skip
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("ce_spliced", "ce_loss_recovered", "fvu", "l0"):
        assert math.isfinite(metrics[key]), key
    assert ("threshold" in metrics) == (variant == "sampled")


def test_mlflow_has_one_run_per_variant(llama_run: Path) -> None:
    """One FINISHED run per variant in the configured store: train/ metrics logged every
    log_every steps, the params, and the eval/ metrics equal to the metrics JSON."""
    from mlflow import MlflowClient

    params = _params(llama_run)
    client = MlflowClient(tracking_uri=params["tracking"]["tracking_uri"])
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = _variant_runs(client, experiment.experiment_id)
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(VARIANTS)
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1  # one parent: the pipeline run
    n_steps = params["train"]["n_tokens"] // params["train"]["batch_size"]
    log_every = params["train"]["log_every"]
    for run in runs:
        variant = run.data.tags["variant"]
        assert run.info.status == "FINISHED"
        cfg = json.loads((llama_run / "models" / variant / "cfg.json").read_text())
        assert cfg["metadata"]["mlflow_run_id"] == run.info.run_id
        history = client.get_metric_history(run.info.run_id, "train/fvu")
        assert [m.step for m in history] == list(range(log_every, n_steps + 1, log_every))
        assert run.data.params["k"] == str(K) and run.data.params["variant"] == variant
        metrics = json.loads((llama_run / "metrics" / f"{variant}.json").read_text())
        for key in ("fvu", "l0", "ce_spliced", "ce_loss_recovered"):
            assert run.data.metrics[f"eval/{key}"] == pytest.approx(metrics[key])


def test_summarize_writes_summary_plots_and_finishes_the_parent_run(llama_run: Path) -> None:
    """summarize writes one summary row per variant equal to its metrics, the plot tables (one
    Pareto row per variant), four PNGs, and logs them (the plots, the metrics directory and the
    summary file) to the FINISHED pipeline parent run,
    whose nested runs hold the SAE directory as an artifact."""
    from mlflow import MlflowClient

    summary = json.loads((llama_run / "summary.json").read_text())
    assert sorted(summary) == sorted([*VARIANTS, "paired"])
    assert len(summary["paired"]) == len(VARIANTS) * (len(VARIANTS) - 1) // 2
    for row in summary["paired"].values():
        assert row["delta_ce_diff_ci_low"] <= row["delta_ce_diff"] <= row["delta_ce_diff_ci_high"]
    for v in VARIANTS:
        metrics = json.loads((llama_run / "metrics" / f"{v}.json").read_text())
        assert summary[v]["fvu"] == metrics["fvu"] and summary[v]["kl_div"] == metrics["kl_div"]
    for pair, row in summary["paired"].items():  # "<a>-<b>": a − b on the same contexts
        a, b = pair.split("-")
        assert row["fvu_diff"] == pytest.approx(summary[a]["fvu"] - summary[b]["fvu"], rel=1e-9)
    pareto = json.loads((llama_run / "plots" / "pareto.json").read_text())
    assert sorted(r["variant"] for r in pareto) == sorted(VARIANTS)
    assert len(list((llama_run / "plots" / "png").glob("*.png"))) == 4
    params = _params(llama_run)
    client = MlflowClient(tracking_uri=params["tracking"]["tracking_uri"])
    runs = _variant_runs(client, client.get_experiment_by_name("saelab").experiment_id)
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.data.tags["saelab.role"] == "pipeline"
    assert parent.data.metrics["topk/fvu"] == pytest.approx(summary["topk"]["fvu"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pareto_l0_fvu.png" in artifacts
    # the summary file and the metrics directory, not the summary's whole directory (the root)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "metrics", "plots", "summary.json"}  # fmt: skip
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "metrics")}
    assert {f"metrics/{v}.json" for v in VARIANTS} <= logged
    for run in runs:
        names = {
            a.path
            for a in client.list_artifacts(run.info.run_id, "models/" + run.data.tags["variant"])
        }
        assert any(n.endswith("sae.safetensors") for n in names)


def test_train_stopped_by_sigterm_resumes_from_its_checkpoints(
    llama_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train --checkpoints DIR` stopped by SIGTERM during step 10 of 16 finishes that step,
    checkpoints it and exits 143 with no SAE written; run again it resumes in the same MLflow
    run (tagged resumed_from_step=10, FINISHED, train/fvu logged once at each log_every step),
    removes DIR and saves the weights of the uninterrupted `train` of llama_run, bit for bit.
    evaluate.n_ctx changes in between: params that do not shape training may differ, and the
    MLflow run keeps their first value."""
    from mlflow import MlflowClient

    params = _params(llama_run)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params["tracking"]["tracking_uri"] = uri
    path = write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    real_step, calls = saelab.train.train_step, []

    def step_with_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            signal.raise_signal(signal.SIGTERM)  # mid-step: handled once the step is done
        return real_step(*args, **kwargs)

    monkeypatch.setattr(saelab.train, "train_step", step_with_sigterm)
    acts = llama_run / "data" / "activations"
    args = ("train", "--params", path, "--variant", "topk", "--activations", acts,
            "--out", "sae", "--checkpoints", "ckpt/topk")  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "sae").exists() and (tmp_path / "ckpt" / "topk").is_dir()

    monkeypatch.setattr(saelab.train, "train_step", real_step)
    n_ctx = params["evaluate"]["n_ctx"]
    params["evaluate"]["n_ctx"] = n_ctx // 2
    write_params(path, params)
    run_cli(*args)

    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == []
    resumed = SparseAutoencoder.load(tmp_path / "sae").state_dict()
    for name, tensor in SparseAutoencoder.load(llama_run / "models" / "topk").state_dict().items():
        assert torch.equal(tensor, resumed[name]), name
    client = MlflowClient(tracking_uri=uri)
    (run,) = _variant_runs(client, client.get_experiment_by_name("saelab").experiment_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "10"
    assert run.data.params["evaluate.n_ctx"] == str(n_ctx)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["mlflow_run_id"] == run.info.run_id
    history = client.get_metric_history(run.info.run_id, "train/fvu")
    assert sorted(m.step for m in history) == [4, 8, 12, 16]


def test_gpt2_prepare_and_cache_at_resid_post(
    tmp_path, tiny_gpt2_dir, tiny_corpus, make_tiny_params
) -> None:
    """Architecture generality: on GPT-2 (decoder layers in transformer.h), cache at
    blocks.1.hook_resid_post stores the output of block 1, i.e. hidden_states[2]."""
    params = make_tiny_params(tiny_gpt2_dir, tiny_corpus, f"sqlite:///{tmp_path / 'mlflow.db'}")
    params["model"]["hookpoint"] = "blocks.1.hook_resid_post"
    path = write_params(tmp_path / "params.yaml", params)
    tokens, acts = tmp_path / "data" / "tokens", tmp_path / "data" / "activations"
    run_cli("prepare", "--params", path, "--out", tokens)
    run_cli("cache", "--params", path, "--tokens", tokens, "--out", acts)
    stores = _check_stores(tmp_path, "blocks.1.hook_resid_post")
    ids = read_tokens(tokens, "train")[0]
    expected = _hidden_state(tiny_gpt2_dir, ids, 2)
    torch.testing.assert_close(stores["train"].read(0, CTX_LEN), expected, rtol=2**-7, atol=1e-6)


# --------------------------------------------------------------------------- bad input

MISSING, EMPTY = "<missing dir>", "<empty dir>"
BAD_PARAMS = [
    pytest.param("k", 0, id="k=0"),
    pytest.param("k", D_SAE + 1, id="k>d_sae"),
    pytest.param("variants", ["topk", "gated"], id="unknown-variant"),
    pytest.param("model.hookpoint", "blocks.99.hook_resid_pre", id="layer-out-of-range"),
    pytest.param("model.name_or_path", MISSING, id="missing-model"),
    pytest.param("data.corpus_dirs", [MISSING], id="missing-corpus"),
    pytest.param("data.corpus_dirs", [EMPTY], id="empty-corpus"),
    pytest.param("cache.max_eval_tokens", 16, id="cache-below-one-context"),
]


@pytest.fixture
def llama_params(tmp_path, tiny_llama_dir, tiny_corpus, make_tiny_params) -> dict:
    """Valid tiny params for the tiny Llama, MLflow store in tmp_path."""
    return make_tiny_params(tiny_llama_dir, tiny_corpus, f"sqlite:///{tmp_path / 'mlflow.db'}")


def _bad_params(root: Path, params: dict, key: str, value) -> Path:
    """``params`` with ``key`` set to ``value`` (MISSING / EMPTY become such directories),
    written to ``root/params.yaml``."""
    (root / "empty-dir").mkdir()
    subst = {MISSING: str(root / "no-such-dir"), EMPTY: str(root / "empty-dir")}
    if isinstance(value, list):
        value = [subst.get(v, v) for v in value]
    else:
        value = subst.get(value, value)
    params = copy.deepcopy(params)
    *parents, leaf = key.split(".")
    node = params
    for p in parents:
        node = node[p]
    node[leaf] = value
    return write_params(root / "params.yaml", params)


def _assert_one_line_naming(stderr: str, key: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"saelab: error: params: {key} "), lines[0]


@pytest.mark.parametrize(("key", "value"), BAD_PARAMS)
def test_prepare_rejects_bad_params(tmp_path, llama_params, capsys, key, value) -> None:
    """A bad parameter exits non-zero with one stderr line naming the key and writes nothing
    (no output directory, no temporary sibling, no MLflow store)."""
    params = _bad_params(tmp_path, llama_params, key, value)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("prepare", "--params", params, "--out", tmp_path / "data" / "tokens")
    assert exit_info.value.code != 0
    _assert_one_line_naming(capsys.readouterr().err, key)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("model.hookpoint", "blocks.99.hook_resid_pre", id="layer-out-of-range"),
        pytest.param("data.corpus_dirs", [EMPTY], id="empty-corpus"),
        pytest.param("cache.max_eval_tokens", 16, id="cache-below-one-context"),
    ],
)
def test_prepare_stage_script_prints_one_line(tmp_path, llama_params, key, value) -> None:
    """Run as DVC runs it (`python stages/prepare.py` in the project dir), a bad parameter ends
    the process with exit code 2 and exactly one stderr line naming the key, and no output."""
    _bad_params(tmp_path, llama_params, key, value)
    before = sorted(os.listdir(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / "prepare.py"), "--params", "params.yaml",
         "--out", "data/tokens"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    _assert_one_line_naming(result.stderr, key)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("stage", ["cache", "train", "baseline", "evaluate"])
def test_later_stages_reject_bad_params_before_work(tmp_path, llama_params, capsys, stage) -> None:
    """cache, train, baseline and evaluate also check params first: k=0 exits non-zero with one line
    naming k, and neither their output nor an MLflow store appears."""
    params = _bad_params(tmp_path, llama_params, "k", 0)
    inputs = tmp_path / "inputs"  # empty: only their existence is checked before params
    inputs.mkdir()
    args = {
        "cache": ["--tokens", inputs, "--out", tmp_path / "out"],
        "train": ["--variant", "topk", "--activations", inputs, "--out", tmp_path / "out"],
        "baseline": ["--tokens", inputs, "--activations", inputs, "--out", tmp_path / "out"],
        "evaluate": ["--variant", "topk", "--tokens", inputs, "--activations", inputs,
                     "--baseline", inputs, "--sae", inputs, "--out", tmp_path / "out.json"],
    }[stage]  # fmt: skip
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(stage, "--params", params, *args)
    assert exit_info.value.code != 0
    _assert_one_line_naming(capsys.readouterr().err, "k")
    assert sorted(os.listdir(tmp_path)) == before


def test_unknown_variant_option_is_a_usage_error(tmp_path, llama_params, capsys) -> None:
    """`train --variant <not a variant>` is refused by the option itself (exit 2, the error names
    --variant) before params or activations are read."""
    params = _bad_params(tmp_path, llama_params, "k", K)
    (tmp_path / "acts").mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("train", "--params", params, "--variant", "gated", "--activations",
                tmp_path / "acts", "--out", tmp_path / "out")  # fmt: skip
    assert exit_info.value.code == 2
    assert "--variant" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(("env", "kept"), [(None, True), ("default", False), ("keep", True)])
def test_malloc_setting_comes_from_saelab_malloc(tmp_path, monkeypatch, env, kept) -> None:
    """Every command sets host memory first: freed memory kept unless SAELAB_MALLOC=default."""
    calls = []
    monkeypatch.setattr("saelab.cli.keep_freed_memory", lambda enable=True: calls.append(enable))
    if env is None:
        monkeypatch.delenv("SAELAB_MALLOC", raising=False)
    else:
        monkeypatch.setenv("SAELAB_MALLOC", env)
    with pytest.raises(SystemExit):  # the params file does not exist
        run_cli("prepare", "--params", tmp_path / "missing.yaml", "--out", tmp_path / "out")
    assert calls == [kept]
