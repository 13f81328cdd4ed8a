"""The variant registry (saelab.sae.registry) is the one declaration of a variant: params.yaml
validation, the command line's choices, build/load, the export map, the README table and
dvc.yaml all follow it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from saelab import config
from saelab.config import ConfigError, parse_params
from saelab.sae import build_sae, registry
from saelab.sae.registry import HParam

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("hparam", "allowed"),
    [
        (HParam("a", float, low=0), "a number >= 0"),
        (HParam("a", float, low=0, low_open=True), "a number > 0"),
        (HParam("a", float, low=0, high=1), "a number in [0, 1]"),
        (HParam("a", float, low=0, high=1, low_open=True, high_open=True), "a number in (0, 1)"),
        (HParam("a", int, low=1), "an integer >= 1"),
        (HParam("a", float, high=2.5), "a number <= 2.5"),
        (HParam("a", str, choices=("x", "y")), "one of x, y"),
        (HParam("a", float, low=0, low_open=True, null="auto"), "null (auto) or a number > 0"),
        (HParam("a", float, low=1, low_open=True, null=""), "null or a number > 1"),
    ],
)
def test_allowed_text_and_bounds(hparam: HParam, allowed: str) -> None:
    """The error's "allowed" text is written from the bounds, and ok() applies the same bounds."""
    assert hparam.allowed_text() == allowed
    if hparam.choices:
        assert hparam.ok("x") and not hparam.ok("z")
    elif hparam.low is not None:
        assert hparam.ok(hparam.low) is not hparam.low_open
        assert not hparam.ok(hparam.low - 1) and hparam.ok(hparam.low + 0.5)
    assert hparam.ok(None) is (hparam.null is not None)


def test_every_variant_has_params_and_its_class_agrees_with_its_spec() -> None:
    """params.yaml has a section per registered variant; the built SAE's hparams() are that
    section, key for key in the spec's order (cfg.json's order)."""
    assert list(PARAMS["variant_params"]) == list(registry.names())
    for name, spec in registry.variants().items():
        hparams = PARAMS["variant_params"][name]
        sae = build_sae(name, 8, 64, 4, hparams, torch.Generator().manual_seed(0))
        assert sae.variant == name
        assert list(sae.hparams()) == [h.name for h in spec.hparams]
        assert sae.hparams() == hparams


def _with(dotted: str, value):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["variants"] = list(registry.names())
    node = raw
    *path, last = dotted.split(".")
    for key in path:
        node = node[key]
    node[last] = value
    return raw


def _out_of_range(h: HParam):
    if h.choices is not None:
        return "not-a-choice"
    if h.low is not None:
        return h.low if h.low_open else h.low - 1
    if h.high is not None:
        return h.high if h.high_open else h.high + 1
    return None


@pytest.mark.parametrize("name", registry.names())
def test_config_checks_each_hparam_from_its_spec(name: str) -> None:
    """For every bounded hyperparameter of every variant, an out-of-range value in params.yaml
    is one ConfigError naming the dotted key and the allowed range; its type is checked too."""
    for h in registry.get(name).hparams:
        key = f"variant_params.{name}.{h.name}"
        bad = _out_of_range(h)
        if bad is not None:
            with pytest.raises(ConfigError) as e:
                parse_params(_with(key, bad))
            assert str(e.value) == f"params: {key} must be {h.allowed_text()}"
        with pytest.raises(ConfigError, match=rf"params: {key} must be"):
            parse_params(_with(key, {"not": "a value"}))


def test_names_derive_from_the_registry() -> None:
    """config.VARIANTS, the --variant choices and the export map are the registry's."""
    from saelab.cli import VARIANT
    from saelab.export import ARCHITECTURES

    assert config.VARIANTS == registry.names() == config.variant_names()

    @VARIANT
    def command(variant: str) -> None: ...

    (option,) = command.__click_params__
    assert tuple(option.type.choices) == registry.names()
    assert ARCHITECTURES == {n: s.saelens for n, s in registry.variants().items() if s.saelens}
    assert "switch" not in ARCHITECTURES and ARCHITECTURES["batchtopk"] == "jumprelu"


def test_readme_table_is_the_registry_s() -> None:
    """README.md's variants table is scripts/variants_table.py's output (one row per variant)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "variants_table.py"), "--check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    table = registry.variants_table()
    assert table in (REPO / "README.md").read_text()
    assert len(table.splitlines()) == 2 + len(registry.names())


def test_dvc_yaml_lists_no_variant_by_name() -> None:
    """dvc.yaml's stages reach every variant through foreach over params' variants or through
    directories: no dep names a variant (a new one needs no dvc.yaml edit; a param may, as
    structure@<v> reads variant_params.sampled.l)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = set(registry.names())
    for stage, body in stages.items():
        for entry in body.get("do", body).get("deps", []):
            parts = set(str(entry).replace(".", "/").split("/"))
            assert not parts & names, (stage, entry)
