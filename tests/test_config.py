"""config.py: params.yaml -> frozen pydantic models; every wrong key is one clear line."""

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from saelab.capture import check_hookpoint
from saelab.config import (
    ConfigError,
    load_params,
    parse_params,
    resolve_model,
    resolve_model_dtype,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())
HP3, HP15 = "blocks.3.hook_resid_pre", "blocks.15.hook_resid_pre"  # params.yaml's: HP15
HP = "blocks.<layer>.hook_resid_pre or blocks.<layer>.hook_resid_post (got 'blocks.3.mlp_out')"
OTHER_THAN_PRIMARY = "hookpoints other than model.hookpoint (blocks.15.hook_resid_pre)"


def _with(path: str, value) -> dict:
    raw = copy.deepcopy(DEFAULT)
    *parents, leaf = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[leaf] = value
    return raw


def test_default_params_load_and_are_frozen() -> None:
    """The committed params.yaml is valid, lists become tuples, and configs cannot be mutated."""
    cfg = load_params(REPO / "params.yaml")
    assert cfg.k == DEFAULT["k"]
    assert cfg.variants == tuple(DEFAULT["variants"])
    assert cfg.model.layer == 15 and cfg.model.site == "resid_pre"
    with pytest.raises(ValidationError, match="frozen"):
        cfg.k = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("k", 0, "k must be an integer in [1, sae.d_sae=4608]"),
        ("k", 4609, "k must be an integer in [1, sae.d_sae=4608]"),
        ("k", "32", "k must be of type int"),
        ("variants", ["topk", "gated"], "variants must be names from"),
        ("variants", [], "variants must be a non-empty list"),
        ("model.hookpoint", "blocks.15.mlp_out", "model.hookpoint must be blocks.<layer>"),
        ("model.extra_hookpoints", [HP3, "blocks.3.mlp_out"], "extra_hookpoints[1] must be " + HP),
        ("model.extra_hookpoints", [HP3, HP3], "model.extra_hookpoints must be distinct hookp"),
        ("model.extra_hookpoints", [HP3, HP15], "extra_hookpoints must be " + OTHER_THAN_PRIMARY),
        ("model.name_or_path", "./no/such/model", "model.name_or_path must be an existing dir"),
        ("model.gguf_file", "missing.gguf", "model.gguf_file must be a file inside"),
        ("model.dtype", "float8", "model.dtype must be one of auto, float32, bfloat16, float16"),
        ("data.corpus_dirs", ["/no/such/corpus"], "data.corpus_dirs must be existing dir"),
        ("data.corpus_dirs", [], "data.corpus_dirs must be a non-empty list"),
        ("data.eval_fraction", 1.5, "data.eval_fraction must be a number in (0, 1)"),
        ("cache.codec", "lzma", "cache.codec must be one of"),
        ("train.lr", -1e-3, "train.lr must be null (auto) or a number > 0"),
        ("train.n_tokens", 10, "train.n_tokens must be an integer >= batch_size"),
        ("train.checkpoint_every", -1, "train.checkpoint_every must be an integer >= 0 (0: never)"),
        ("sae.exclude_norm_factor", 0.5, "sae.exclude_norm_factor must be null or a number > 1"),
        ("variant_params.relu.l1_coef", -0.1, "variant_params.relu.l1_coef must be a number >= 0"),
        ("variant_params.jumprelu.bandwidth", 0, "jumprelu.bandwidth must be a number > 0"),
        ("variant_params.jumprelu.l0_coef", -1, "jumprelu.l0_coef must be a number >= 0"),
        ("variant_params.jumprelu.init_threshold", 0.0, "init_threshold must be null (from"),
        ("variant_params.jumprelu.threshold_lr_scale", 0, "threshold_lr_scale must be a number >"),
        ("variant_params.sampled.l", 0, "variant_params.sampled.l must be an integer >= 1"),
        ("variant_params.sampled.l", 2.5, "variant_params.sampled.l must be of type int"),
        ("variant_params.sampled.score", "l1", "sampled.score must be one of l2, squared_l2, ent"),
        ("variant_params.sampled.pool", "random", "sampled.pool must be one of top, sample"),
        ("variant_params.topk", None, "variant_params.topk must be a mapping of NoParams keys"),
        ("variant_params.relu.init_b_enc", "x", "relu.init_b_enc must be one of zero, quantile"),
        ("variant_params.switch.n_experts", 0, "switch.n_experts must be an integer >= 1"),
        ("variant_params.switch.balance_coef", -1.0, "switch.balance_coef must be a number >= 0"),
        ("structure.ks", [], "structure.ks must be a non-empty list of integers > 0"),
        ("structure.n_folds", 1, "structure.n_folds must be an integer >= 2"),
        ("structure.n_words", 50, "structure.n_words must be null or an integer >= 10"),
        ("structure.min_probe_f1", 1.0, "structure.min_probe_f1 must be a number in [0, 1)"),
        ("distributed.nproc_per_node", 0, "distributed.nproc_per_node must be an integer >= 1"),
        ("distributed.nproc_per_node", 8192, "train.batch_size must be an integer >= distrib"),
        ("distributed.cache_nproc_per_node", 0, "distributed.cache_nproc_per_node must be an i"),
        ("distributed.launcher", " ", "distributed.launcher must be a command, e.g. 'torchrun"),
    ],
)
def test_bad_value_names_key_and_allowed_range(key: str, value, message: str) -> None:
    """A wrong value raises ConfigError whose single line names the key and what is allowed."""
    with pytest.raises(ConfigError) as err:
        parse_params(_with(key, value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("k", True, "params: k must be of type int (got True)"),
        ("data.eval_fraction", True, "params: data.eval_fraction must be of type float (got True)"),
        ("structure.ks", [1, "2"], "params: structure.ks[1] must be of type int (got '2')"),
        ("structure.ks", [1, 0], "params: structure.ks must be a non-empty list of integers > 0"),
        ("structure.ks", 5, "params: structure.ks must be a list"),
        ("model.extra_hookpoints", HP3, "params: model.extra_hookpoints must be a list"),
        ("model.extra_hookpoints", [3], "params: model.extra_hookpoints[0] must be of type str"),
        ("data", ["a"], "params: data must be a mapping of DataConfig keys"),
        ("variant_params.sampled.l", True, "params: variant_params.sampled.l must be of type int"),
        ("export.hub_id", "a/b/c", "params: export.hub_id must be null or a hub id (name or org/"),
    ],
)
def test_strict_types_name_the_key(key: str, value, message: str) -> None:
    """A bool is neither an int nor a number, a list's wrong item is named by its index, and a
    section must be a mapping: each is one line."""
    with pytest.raises(ConfigError) as err:
        parse_params(_with(key, value))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_integral_floats_are_ints_and_ints_are_numbers() -> None:
    """YAML's ``16.0`` is the integer 16 (also in a list and in a variant's section) and ``0``
    the number 0.0, as their fields' types."""
    raw = _with("k", 16.0)
    raw["structure"]["ks"] = [1.0, 2]
    raw["variant_params"]["sampled"]["l"] = 8.0
    raw["train"]["aux_coef"] = 0
    cfg = parse_params(raw)
    assert (cfg.k, cfg.structure.ks, cfg.variant_params.sampled.l) == (16, (1, 2), 8)
    assert type(cfg.k) is int and type(cfg.structure.ks[0]) is int
    assert type(cfg.train.aux_coef) is float


def test_dump_is_params_yaml_and_replace_validates() -> None:
    """model_dump gives back params.yaml's values, each variant's section included (MLflow's
    params and the params hash read it); replace() checks the changed key like params.yaml's."""
    import json

    from saelab.config import replace

    cfg = parse_params(DEFAULT)
    dumped = json.loads(json.dumps(cfg.model_dump()))
    assert dumped["variant_params"] == DEFAULT["variant_params"]
    assert {k: v for k, v in dumped.items() if k not in ("data", "model")} == {
        k: v for k, v in DEFAULT.items() if k not in ("data", "model")
    }
    assert replace(cfg.model, hookpoint="blocks.3.hook_resid_post").layer == 3
    with pytest.raises(ConfigError, match=r"^params: model\.hookpoint must be blocks\.<layer>"):
        replace(cfg.model, hookpoint="blocks.3.mlp_out")


def test_unknown_key_is_named_with_the_allowed_ones() -> None:
    """A typo (train.learning_rate) is an error listing the section's keys, not ignored."""
    raw = copy.deepcopy(DEFAULT)
    raw["train"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match=r"unknown key train\.learning_rate \(allowed: train\."):
        parse_params(raw)


def test_missing_key_is_named() -> None:
    """Every key is required: params.yaml is the one place hyperparameters live."""
    raw = copy.deepcopy(DEFAULT)
    del raw["evaluate"]["n_ctx"]
    with pytest.raises(ConfigError, match=r"missing key evaluate\.n_ctx"):
        parse_params(raw)


def test_hookpoint_layer_out_of_range_lists_valid_ones() -> None:
    """Layer 30 of a 30-layer model is an error naming the valid range [0, 29]."""
    cfg = parse_params(_with("model.hookpoint", "blocks.30.hook_resid_post")).model
    with pytest.raises(ConfigError, match=r"L in \[0, 29\] .*got blocks\.30\.hook_resid_post"):
        check_hookpoint(cfg, n_layers=30)
    check_hookpoint(parse_params(DEFAULT).model, n_layers=30)  # layer 15: fine


def test_extra_hookpoints_layers_are_checked_against_the_model() -> None:
    """An extra hookpoint past the model's last layer is an error naming it by its index (the
    prepare stage checks every hookpoint before any work)."""
    from saelab.capture import check_hookpoints

    raw = _with("model.extra_hookpoints", ["blocks.3.hook_resid_post", "blocks.30.hook_resid_pre"])
    model = parse_params(raw).model
    assert model.hookpoints == ("blocks.15.hook_resid_pre", *raw["model"]["extra_hookpoints"])
    with pytest.raises(ConfigError, match=r"^params: model\.extra_hookpoints\[1\] must be .* L in "
                       r"\[0, 29\] .*got blocks\.30\.hook_resid_pre"):  # fmt: skip
        check_hookpoints(model, n_layers=30)
    check_hookpoints(model, n_layers=31)


def test_extra_hookpoints_need_the_one_process_cache() -> None:
    """The cache of several processes writes one hookpoint: extra hookpoints with
    distributed.cache_nproc_per_node > 1 are refused when params load, naming both keys."""
    raw = _with("model.extra_hookpoints", ["blocks.3.hook_resid_pre"])
    raw["distributed"]["cache_nproc_per_node"] = 2
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert str(err.value) == (
        "params: model.extra_hookpoints must be [] while distributed.cache_nproc_per_node > 1 "
        "(the cache of several processes writes one hookpoint)"
    )
    raw["model"]["extra_hookpoints"] = []
    assert parse_params(raw).distributed.cache_nproc_per_node == 2


def test_at_hookpoint_is_the_config_of_one_extra_hookpoint() -> None:
    """at_hookpoint(cfg, h) is cfg with model.hookpoint = h and no extra hookpoints, all else
    equal; None or model.hookpoint give cfg itself; a hookpoint not in params is an error naming
    the ones that are."""
    from saelab.config import at_hookpoint

    extras = ["blocks.3.hook_resid_pre", "blocks.20.hook_resid_post"]
    cfg = parse_params(_with("model.extra_hookpoints", extras))
    at = at_hookpoint(cfg, "blocks.20.hook_resid_post")
    assert at.model.hookpoint == "blocks.20.hook_resid_post" and at.model.layer == 20
    assert at.model.extra_hookpoints == ()
    assert at.model_dump(exclude={"model"}) == cfg.model_dump(exclude={"model"})
    same = {"hookpoint", "extra_hookpoints"}
    assert at.model.model_dump(exclude=same) == cfg.model.model_dump(exclude=same)
    assert at_hookpoint(cfg, None) is cfg and at_hookpoint(cfg, cfg.model.hookpoint) is cfg
    with pytest.raises(ConfigError) as err:
        at_hookpoint(cfg, "blocks.4.hook_resid_pre")
    assert str(err.value) == (
        "--hookpoint blocks.4.hook_resid_pre must be model.hookpoint (blocks.15.hook_resid_pre) "
        "or one of params model.extra_hookpoints (blocks.3.hook_resid_pre, "
        "blocks.20.hook_resid_post)"
    )
    with pytest.raises(ConfigError, match=r"extra_hookpoints \(none\)$"):
        at_hookpoint(parse_params(DEFAULT), "blocks.3.hook_resid_pre")


def test_hub_id_is_accepted_without_a_local_directory() -> None:
    """``org/name`` is a hub id (loaded from the local HF cache), not a missing path."""
    cfg = parse_params(
        {**_with("model.name_or_path", "HuggingFaceTB/SmolLM2-135M"),
         "model": {**DEFAULT["model"], "name_or_path": "HuggingFaceTB/SmolLM2-135M",
                   "gguf_file": None}}
    )  # fmt: skip
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M"


def test_variant_params_unknown_and_missing_keys_are_named() -> None:
    """A typo in a variant's section, a key under a variant that takes none, or a missing
    section are errors naming the dotted key."""
    with pytest.raises(ConfigError, match=r"unknown key variant_params\.jumprelu\.theta "
                       r"\(allowed: variant_params\.jumprelu\.bandwidth, "):  # fmt: skip
        parse_params(_with("variant_params.jumprelu.theta", 0.1))
    with pytest.raises(ConfigError, match=r"unknown key variant_params\.topk\.l \(allowed: none\)"):
        parse_params(_with("variant_params.topk.l", 2))
    raw = copy.deepcopy(DEFAULT)
    del raw["variant_params"]["sampled"]
    with pytest.raises(ConfigError, match=r"missing key variant_params\.sampled"):
        parse_params(raw)


def test_variant_params_give_build_sae_keywords() -> None:
    """of(variant) is the variant's section as a dict (empty for topk/batchtopk), and every
    variant builds from the committed params.yaml."""
    from saelab.config import VARIANTS
    from saelab.sae import build_sae

    cfg = parse_params(_with("variants", list(VARIANTS)))
    assert cfg.variant_params.of("topk") == {} == cfg.variant_params.of("batchtopk")
    assert cfg.variant_params.of("sampled") == DEFAULT["variant_params"]["sampled"]
    for variant in cfg.variants:
        sae = build_sae(variant, 8, cfg.sae.d_sae, cfg.k, cfg.variant_params.of(variant))
        assert sae.variant == variant
        assert sae.hparams() == DEFAULT["variant_params"][variant]


def test_switch_experts_must_split_d_sae_and_hold_k() -> None:
    """With switch in the variants, n_experts must divide sae.d_sae and k fit in one expert;
    the error names the key and the bound (4608 / 8 = 576 latents per expert)."""
    raw = _with("variants", ["switch"])
    raw["variant_params"]["switch"]["n_experts"] = 7
    with pytest.raises(ConfigError, match=r"switch\.n_experts must be a divisor of sae\.d_sae"):
        parse_params(raw)
    raw = _with("variants", ["switch"])
    raw["k"] = 577
    with pytest.raises(ConfigError, match=r"k must be at most .* = 576"):
        parse_params(raw)
    raw = _with("variants", ["topk"])  # not trained: not checked
    raw["variant_params"]["switch"]["n_experts"] = 7
    assert parse_params(raw).variant_params.switch.n_experts == 7


def _repo_beside_data(tmp_path: Path) -> tuple[Path, dict]:
    """<tmp>/repo with the data beside it in <tmp>/shared (corpus dir, model dir), and params that
    name them relative to the repo root, as the committed params.yaml does."""
    repo, shared = tmp_path / "repo", tmp_path / "shared"
    (shared / "corpus" / "a").mkdir(parents=True)
    (shared / "model").mkdir()
    (repo / "models" / "local").mkdir(parents=True)
    raw = _with("data.corpus_dirs", ["../shared/corpus/a"])
    raw["model"].update(name_or_path="../shared/model", gguf_file=None)
    return repo, raw


@pytest.mark.parametrize("dvc_root", ["repo", "exp_copy"], ids=["dvc3-root", "copy-root"])
def test_relative_paths_resolve_against_the_repo_root_in_a_dvc_exp_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dvc_root: str
) -> None:
    """A queued / --temp `dvc exp run` executes in <repo>/.dvc/tmp/exps/<tmp>; its stages see
    DVC_ROOT=<repo> (DVC 3) or, on a DVC that does not override it, the copy. Either way
    ``../shared/...`` is <tmp>/shared/..., not a path under the copy."""
    repo, raw = _repo_beside_data(tmp_path)
    exp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    exp_copy.mkdir(parents=True)
    monkeypatch.chdir(exp_copy)
    monkeypatch.setenv("DVC_ROOT", str(repo if dvc_root == "repo" else exp_copy))
    cfg = parse_params(raw)
    shared = tmp_path.resolve() / "shared"
    assert cfg.data.corpus_dirs == (str(shared / "corpus" / "a"),)
    assert cfg.model.name_or_path == str(shared / "model")


def test_path_params_absolute_hub_ids_and_uris(tmp_path: Path) -> None:
    """Relative paths join the root; absolute paths, hub ids and non-sqlite URIs stay as written;
    a bare ``dir/name`` is a local model when that directory exists under the root."""
    repo, raw = _repo_beside_data(tmp_path)
    root = repo.resolve()
    corpus = str(tmp_path / "shared" / "corpus" / "a")
    raw["data"]["corpus_dirs"] = [corpus]
    assert parse_params(raw, root=root).data.corpus_dirs == (corpus,)
    raw["model"]["name_or_path"] = "models/local"
    assert parse_params(raw, root=root).model.name_or_path == str(root / "models" / "local")
    raw["model"]["name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    assert parse_params(raw, root=root).model.name_or_path == "HuggingFaceTB/SmolLM2-135M"
    for written, resolved in [
        ("sqlite:///runs/mlflow.db", f"sqlite:///{root}/runs/mlflow.db"),
        ("sqlite:///../mlflow.db", f"sqlite:///{root.parent}/mlflow.db"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("mlruns", str(root / "mlruns")),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        (None, None),
    ]:
        raw["tracking"]["tracking_uri"] = written
        assert parse_params(raw, root=root).tracking.tracking_uri == resolved, written


def test_recorded_paths_are_relative_to_the_repo_root_inside_its_parent(tmp_path) -> None:
    """Outputs record ``../shared/x`` for a path beside the checkout and ``data/x`` inside it, the
    same from any checkout location; paths elsewhere and hub ids as given."""
    from saelab.config import recorded_path

    root = tmp_path / "main"
    assert recorded_path(str(tmp_path / "shared" / "x"), root) == "../shared/x"
    assert recorded_path(str(root / "data" / "x"), root) == "data/x"
    assert recorded_path("/elsewhere/models/m", root) == "/elsewhere/models/m"
    assert recorded_path("HuggingFaceTB/SmolLM2-135M", root) == "HuggingFaceTB/SmolLM2-135M"


CPU_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


@pytest.mark.parametrize("native", [False, True])
def test_model_dtype_auto_is_bf16_only_where_the_device_runs_it_natively(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """model.dtype auto: bfloat16 on a CPU whose feature probes report AVX512-BF16 or AMX, and
    on a CUDA GPU with native (not emulated) bf16; float32 otherwise (an AVX2-only CPU). An
    explicit dtype is kept whatever the device. resolve_model writes the resolved name."""
    import torch

    for probe in CPU_PROBES:
        monkeypatch.setattr(torch.cpu, probe, lambda v=native: v)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation, v=native: v)
    model = parse_params(_with("model.dtype", "auto")).model
    expected = torch.bfloat16 if native else torch.float32
    for device in ("cpu", "cuda"):
        assert resolve_model_dtype(model, torch.device(device)) is expected
    assert resolve_model(model, torch.device("cpu")).dtype == str(expected).removeprefix("torch.")
    for name in ("float32", "bfloat16", "float16"):
        fixed = parse_params(_with("model.dtype", name)).model
        assert resolve_model_dtype(fixed, torch.device("cpu")) is getattr(torch, name)
        assert resolve_model(fixed, torch.device("cpu")) == fixed


def test_one_probe_suffices_and_other_devices_get_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMX alone (an Intel CPU without the AVX512-BF16 flag) gives bf16; a device that is
    neither CPU nor CUDA (mps) gets float32 under auto."""
    import torch

    monkeypatch.setattr(torch.cpu, CPU_PROBES[0], lambda: False)
    monkeypatch.setattr(torch.cpu, CPU_PROBES[1], lambda: True)
    model = parse_params(_with("model.dtype", "auto")).model
    assert resolve_model_dtype(model, torch.device("cpu")) is torch.bfloat16
    assert resolve_model_dtype(model, torch.device("mps")) is torch.float32
