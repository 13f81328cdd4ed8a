"""Bad, mismatched and corrupt inputs (issue 15, parts 2 and 3): every stage command stops
with exactly one stderr line ``saelab: error: ...`` naming the file or both sides, exit 2, and
writes nothing (no output, no temporary sibling, no MLflow store). Inputs come from one tiny
pipeline run (prepare, cache, train topk, baseline on the tiny Llama); each test corrupts a
copy."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

import saelab.cache
from saelab.checkpoint import STATE_FILE, load_checkpoint
from saelab.config import InputError, load_params
from saelab.sae import build_sae, load_sae
from saelab.store import ActivationStore, ActivationWriter
from tests.test_cli import run_cli, write_params

VARIANT = "topk"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models run as fast on one thread, and far faster on a machine shared with others."""


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, tiny_corpus_module, make_tiny_params) -> Path:
    """prepare -> cache -> train (topk) -> baseline on the tiny Llama, once (read-only)."""
    root = tmp_path_factory.mktemp("inputs")
    tiny = make_tiny_params(tiny_llama_dir, tiny_corpus_module, f"sqlite:///{root / 'ml.db'}")
    params = write_params(root / "params.yaml", tiny)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
            mp.delenv(var, raising=False)
        run_cli("prepare", "--params", params, "--out", "data/tokens")
        run_cli("cache", "--params", params, "--tokens", "data/tokens", "--out", "data/activations")
        run_cli("train", "--params", params, "--variant", VARIANT,
                "--activations", "data/activations", "--out", f"models/{VARIANT}")  # fmt: skip
        run_cli("baseline", "--params", params, "--tokens", "data/tokens",
                "--activations", "data/activations", "--out", "data/baseline")  # fmt: skip
    return root


@pytest.fixture
def work(tmp_path, run, monkeypatch) -> Path:
    """A working directory with the run's params (MLflow store in it, not yet created) and
    copies of its outputs under in/, safe to corrupt."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    shutil.copytree(run / "data", tmp_path / "in")
    shutil.copytree(run / "models", tmp_path / "in" / "models")
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_params(tmp_path / "params.yaml", params)
    return tmp_path


def _params(work: Path, **changes) -> Path:
    """The work dir's params with dotted keys changed, as params.yaml."""
    params = yaml.safe_load((work / "params.yaml").read_text())
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[leaf] = value
    return write_params(work / "params.yaml", params)


STAGE_ARGS = {
    "train": ["--variant", VARIANT, "--activations", "in/activations", "--out", "out"],
    "baseline": ["--tokens", "in/tokens", "--activations", "in/activations", "--out", "out"],
    "evaluate": ["--variant", VARIANT, "--tokens", "in/tokens", "--activations", "in/activations",
                 "--baseline", "in/baseline", "--sae", f"in/models/{VARIANT}", "--out", "out.json",
                 "--hist", "hist.json", "--per-context", "pc.npz"],
    "structure": ["--variant", VARIANT, "--probes", "in", "--activations", "in/activations",
                  "--sae", f"in/models/{VARIANT}", "--out", "out.json"],
    "features": ["--variant", VARIANT, "--tokens", "in/tokens", "--activations",
                 "in/activations", "--sae", f"in/models/{VARIANT}", "--out", "out"],
}  # fmt: skip


def _fails_with_one_line(work: Path, capsys, stage: str, *extra: str) -> str:
    """Run ``stage`` on the work dir's inputs; assert exit 2, one stderr line, nothing written
    in the work dir (outputs, temp siblings, MLflow store); return the line after the prefix."""
    before = sorted(os.listdir(work))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(stage, "--params", work / "params.yaml", *STAGE_ARGS[stage], *extra)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("saelab: error: "), lines[0]
    assert sorted(os.listdir(work)) == before
    return lines[0].removeprefix("saelab: error: ")


# --------------------------------------------------------------------------- part 2: mismatches


@pytest.mark.parametrize("stage", ["train", "baseline", "evaluate", "structure", "features"])
def test_a_hookpoint_other_than_the_inputs_is_refused_before_work(work, capsys, stage) -> None:
    """params model.hookpoint blocks.1 on a store (and SAE) made at blocks.2: one line naming
    both hookpoints, before a model is loaded or an MLflow run opened."""
    _params(work, **{"model.hookpoint": "blocks.1.hook_resid_pre"})
    line = _fails_with_one_line(work, capsys, stage)
    assert line.startswith("params model.hookpoint is 'blocks.1.hook_resid_pre' but "), line
    assert line.endswith("'s hookpoint is 'blocks.2.hook_resid_pre'"), line


def _native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool = True) -> None:
    """Make torch's CPU feature probes report AVX512-BF16/AMX (or neither)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda v=native: v)


@pytest.mark.parametrize("stage", ["baseline", "evaluate"])
def test_an_lm_precision_other_than_the_inputs_is_refused(work, capsys, monkeypatch, stage):
    """model.dtype auto on a CPU with native bf16 resolves to bfloat16, but the store (and the
    baseline, and the SAE's activations) came from the LM in float32: one line naming both
    precisions, before a model is loaded; the spliced ΔCE would mix two precisions."""
    _native_bf16(monkeypatch)
    _params(work, **{"model.dtype": "auto"})
    line = _fails_with_one_line(work, capsys, stage)
    assert line == (
        "params model.dtype is 'bfloat16' but activation store in/activations/eval's "
        "model_dtype is 'float32'"
    )


def test_a_baseline_of_another_lm_precision_is_refused(work, capsys) -> None:
    """A baseline whose clean CE came from the LM in bf16, with a float32 store, SAE and params:
    the line names the SAE's cfg.json and the baseline (ΔCE = spliced CE - the baseline's
    clean CE needs both from one precision)."""
    path = work / "in" / "baseline" / "baseline.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_dtype": "bfloat16"}))
    line = _fails_with_one_line(work, capsys, "evaluate")
    assert line == (
        f"in/models/{VARIANT}/cfg.json's model_dtype is 'float32' but the baseline's "
        "baseline.json's model_dtype is 'bfloat16'"
    )


def test_auto_on_a_cpu_without_bf16_is_float32_and_accepts_float32_inputs(
    work, monkeypatch
) -> None:
    """model.dtype auto on an AVX2-only CPU resolves to float32: the float32 run's inputs pass,
    and the metrics file says float32."""
    _native_bf16(monkeypatch, native=False)
    _params(work, **{"model.dtype": "auto"})
    run_cli("evaluate", "--params", work / "params.yaml", *STAGE_ARGS["evaluate"])
    assert json.loads((work / "out.json").read_text())["model_dtype"] == "float32"


def test_the_lm_in_bf16_runs_every_stage_and_records_its_dtype(work, monkeypatch) -> None:
    """model.dtype auto on a (patched) bf16-capable CPU: cache, train, baseline and evaluate run
    with the LM in bf16 (cache rows are bf16 values; the baseline's own checks, cache against
    the full forward at another batch size and suffix CE against the full forward's, pass at
    the bf16 tolerances), and every output records bfloat16."""
    _native_bf16(monkeypatch)
    params = _params(work, **{"model.dtype": "auto"})
    acts, sae_dir = work / "bf16" / "activations", work / "bf16" / VARIANT
    run_cli("cache", "--params", params, "--tokens", "in/tokens", "--out", acts)
    run_cli("train", "--params", params, "--variant", VARIANT, "--activations", acts,
            "--out", sae_dir)  # fmt: skip
    run_cli("baseline", "--params", params, "--tokens", "in/tokens", "--activations", acts,
            "--out", work / "bf16" / "baseline")  # fmt: skip
    run_cli("evaluate", "--params", params, "--variant", VARIANT, "--tokens", "in/tokens",
            "--activations", acts, "--baseline", work / "bf16" / "baseline", "--sae", sae_dir,
            "--out", work / "bf16" / "m.json")  # fmt: skip
    for split in ("train", "eval"):
        store = ActivationStore(acts / split)
        assert store.attrs["model_dtype"] == "bfloat16"
    x = ActivationStore(acts / "eval").read(0, 256)  # a float32 store of bf16 values
    assert torch.equal(x, x.bfloat16().float()) and not torch.equal(
        x, ActivationStore(work / "in" / "activations" / "eval").read(0, 256)
    )
    assert load_sae(sae_dir).metadata["model_dtype"] == "bfloat16"
    baseline = json.loads((work / "bf16" / "baseline" / "baseline.json").read_text())
    assert baseline["model_dtype"] == "bfloat16"
    metrics = json.loads((work / "bf16" / "m.json").read_text())
    assert metrics["model_dtype"] == "bfloat16" and np.isfinite(metrics["delta_ce"])


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_another_model_than_the_inputs_is_refused(
    work, capsys, stage, tiny_gpt2_dir, tiny_llama_dir
) -> None:
    """params model.name_or_path naming another model than the store's: one line, both named."""
    _params(work, **{"model.name_or_path": str(tiny_gpt2_dir)})
    line = _fails_with_one_line(work, capsys, stage)
    split = "train" if stage == "train" else "eval"
    assert line == (  # paths as outputs record them (relative to the root, saelab.config)
        f"params model.name_or_path is '../{tiny_gpt2_dir.name}' but activation store "
        f"in/activations/{split}'s model is '../{tiny_llama_dir.name}'"
    )


def test_an_sae_of_another_hookpoint_than_the_store_is_refused(work, capsys) -> None:
    """An SAE whose cfg.json says blocks.3 with a store and params at blocks.2: the line names the
    SAE's cfg.json and the store (the params agree with the store)."""
    cfg_path = work / "in" / "models" / VARIANT / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["hookpoint"] = "blocks.3.hook_resid_pre"
    cfg_path.write_text(json.dumps(cfg))
    for stage in ("evaluate", "structure", "features"):
        line = _fails_with_one_line(work, capsys, stage)
        assert line == (
            f"activation store in/activations/eval's hookpoint is 'blocks.2.hook_resid_pre' but "
            f"in/models/{VARIANT}/cfg.json's hookpoint is 'blocks.3.hook_resid_pre'"
        )


def test_an_sae_of_another_width_than_the_store_is_refused(work, capsys) -> None:
    """An SAE with d_in 32 on a d_in-64 store: one line naming both d_in."""
    sae_dir = work / "in" / "models" / VARIANT
    metadata = load_sae(sae_dir).metadata
    build_sae(VARIANT, 32, 128, 8, {}, torch.Generator().manual_seed(0)).save(sae_dir, metadata)
    line = _fails_with_one_line(work, capsys, "evaluate")
    assert line == (
        f"activation store in/activations/eval's d_in is 64 but in/models/{VARIANT}/cfg.json's "
        "d_in is 32"
    )


# --------------------------------------------------------------------------- part 3: corrupt files


def test_params_that_are_not_yaml_give_one_line(work, capsys) -> None:
    (work / "params.yaml").write_text("k: 32\nsae: [unclosed\n  d_sae: 4\n")
    line = _fails_with_one_line(work, capsys, "train")
    assert line == (
        f"params: {work / 'params.yaml'} is not valid YAML (expected ',' or ']', but got ':' "
        "at line 3, column 8)"
    )


def test_corrupt_sae_files_give_one_line_naming_the_file(work, capsys) -> None:
    """cfg.json cut short, then a truncated sae.safetensors: evaluate names each file."""
    sae_dir = work / "in" / "models" / VARIANT
    good_cfg = (sae_dir / "cfg.json").read_text()
    (sae_dir / "cfg.json").write_text(good_cfg[:40])
    line = _fails_with_one_line(work, capsys, "evaluate")
    assert line.startswith(f"in/models/{VARIANT}/cfg.json: not valid JSON ("), line
    (sae_dir / "cfg.json").write_text(good_cfg)
    weights = sae_dir / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = _fails_with_one_line(work, capsys, "evaluate")
    assert line.startswith(f"in/models/{VARIANT}/sae.safetensors: unreadable ("), line


def test_a_corrupt_zarr_json_gives_one_line(work, capsys) -> None:
    meta = work / "in" / "activations" / "train" / "zarr.json"
    meta.write_text(meta.read_text()[:100])
    line = _fails_with_one_line(work, capsys, "train")
    assert line.startswith("in/activations/train/zarr.json: unreadable (JSONDecodeError: "), line


def test_store_attrs_without_d_in_give_one_line(work, capsys) -> None:
    meta = work / "in" / "activations" / "train" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["d_in"]
    meta.write_text(json.dumps(doc))
    line = _fails_with_one_line(work, capsys, "train")
    assert line == "activation store in/activations/train lacks attributes ['d_in']"


def test_a_corrupt_chunk_gives_one_line_naming_store_and_rows(work, capsys) -> None:
    """Bytes overwritten at the start of chunk 1 (blosc cannot decode it): the line names the
    store, the chunk and its rows."""
    chunk = work / "in" / "activations" / "train" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[:64] = b"\xff" * 64
    chunk.write_bytes(bytes(data))
    line = _fails_with_one_line(work, capsys, "train")
    assert line.startswith(
        "activation store in/activations/train: chunk 1 (rows 1024..2047) unreadable ("
    ), line
    assert line.endswith("): re-run the cache stage")


def test_a_missing_chunk_file_is_refused_not_read_as_zeros(work, capsys) -> None:
    """zarr reads a missing chunk as zeros; the store refuses to open instead."""
    (work / "in" / "activations" / "train" / "c" / "2" / "0").unlink()
    line = _fails_with_one_line(work, capsys, "train")
    assert line == (
        "activation store in/activations/train: chunk file c/2/0 (rows 2048..3071) is missing: "
        "re-run the cache stage"
    )


def test_nan_in_a_training_chunk_stops_train_naming_the_row(work, capsys) -> None:
    """A NaN written into row 3000 of the train store: train stops at that chunk's read."""
    array = zarr.open_array(str(work / "in" / "activations" / "train"), mode="r+")
    row = array[3000:3001]
    row[0, 7] = 0x7FC0 if row.dtype == np.uint16 else np.nan  # bfloat16 bits: a quiet NaN
    array[3000:3001] = row
    line = _fails_with_one_line(work, capsys, "train")
    assert line == (
        "activation store in/activations/train: rows 2048..3071 hold 1 NaN/inf values in 1 "
        "rows, the first in row 3000: re-run the cache stage"
    )


def test_nan_from_the_model_stops_cache_naming_the_rows(work, capsys, monkeypatch) -> None:
    """Activations with an inf in the second batch (a float16 overflow, say) stop the cache
    stage with one line naming the store and the rows; no store is written."""
    real, calls = saelab.cache.capture_resid, []

    def overflowing(model, cfg, ids):
        resid = real(model, cfg, ids).clone()  # an inference tensor: clone to edit it
        calls.append(1)
        if len(calls) == 2:
            resid[1, 3, 0] = float("inf")
        return resid

    monkeypatch.setattr(saelab.cache, "capture_resid", overflowing)
    before = sorted(os.listdir(work))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("cache", "--params", work / "params.yaml", "--tokens", "in/tokens",
                "--out", "acts")  # fmt: skip
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()  # after the model's loading bars
    assert sum(line.startswith("saelab: error") for line in lines) == 1, lines
    ctx_len, batch = 32, 8  # tiny_params: data.ctx_len, cache.batch_size
    first = batch * ctx_len  # the second batch starts at this row
    assert lines[-1] == (
        f"saelab: error: cache: the model's blocks.2.hook_resid_pre activations for store "
        f"acts.tmp-{os.getpid()}/train: rows {first}..{2 * first - 1} hold 1 NaN/inf values in "
        f"1 rows, the first in row {first + ctx_len + 3}: check model.dtype (now float32) and "
        "the model"
    )
    assert sorted(os.listdir(work)) == before


def test_store_reads_check_every_block_for_nan_and_inf(tmp_path) -> None:
    """Known answer: an inf at row 5 and a NaN at row 9 of a float32 store are reported by any
    read covering them, with the first bad row (each alone too: the fast path, extremes by
    aminmax, sees both kinds); reads elsewhere pass."""
    x = torch.ones(16, 4)
    x[5, 2], x[9, 0] = float("inf"), float("nan")
    with ActivationWriter(tmp_path / "s", 16, 4, "float32", "none", 0, 8, {"ctx_len": 4}) as w:
        w.write(x)
    store = ActivationStore(tmp_path / "s")
    assert torch.equal(store.read(0, 5), x[:5])
    with pytest.raises(InputError, match=r"rows 4\.\.11 hold 2 NaN/inf values in 2 rows, the "
                       r"first in row 5"):  # fmt: skip
        store.read(4, 12)
    with pytest.raises(
        InputError, match=r"rows 4\.\.5 hold 1 NaN/inf values in 1 rows, the first in row 5"
    ):
        store.read(4, 6)  # an inf alone
    with pytest.raises(InputError, match=r"the first in row 9"):
        store.read(8, 16)  # a NaN alone


def test_checkpoint_state_is_never_unpickled(tmp_path, caplog) -> None:
    """trainer_state.pt is read with weights_only=True: a state whose pickle would run code on
    load (an object with __reduce__ that writes a file) is refused as unreadable and the run
    starts fresh; the code never runs. The same file loaded with weights_only=False does run it,
    so the payload is real."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    build_sae(VARIANT, 8, 16, 2, {}).save(ckpt, {})
    torch.save({"step": _Payload(marker)}, ckpt / STATE_FILE)  # pickles the payload
    assert load_checkpoint(ckpt, "any") is None
    assert not marker.exists()
    assert any("not resuming" in r.getMessage() and "unreadable" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    torch.load(ckpt / STATE_FILE, weights_only=False)
    assert marker.exists()


class _Payload:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "ran"))


def test_load_params_still_accepts_the_repository_params() -> None:
    """The YAML check does not reject a valid file (the repository's own params.yaml)."""
    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml").k > 0
