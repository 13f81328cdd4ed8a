"""saelab.browse: the feature-page collector against a dense reference, the logit lens and the
decoder neighbours against plain matmuls, escaping of corpus text, and the generated page of a
tiny pipeline loaded in headless Chromium (DOM checked, screenshot saved)."""

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from saelab.browse.build import environment, write_data
from saelab.browse.collect import (
    HIST_BINS,
    FeatureCollector,
    hist_bin,
    hist_edges,
    sample_keys,
)
from saelab.browse.lens import logit_lens, nearest_by_cosine
from saelab.config import recorded_path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# --------------------------------------------------------------------------- collector


def _dense_case() -> tuple[torch.Tensor, torch.Tensor]:
    """acts [T=48, S=5] (6 contexts of 8 tokens) and kept [T]: latent 0 has ties (value 2.0 at
    rows 3, 9, 20, 41), latent 1 fires twice (fewer than N), latent 2 never, latent 3 at random,
    latent 4 everywhere; row 17 is excluded (its large values must be ignored)."""
    g = torch.Generator().manual_seed(0)
    acts = torch.zeros(48, 5)
    acts[[3, 9, 20, 41], 0] = 2.0
    acts[[5, 30], 0] = 1.0
    acts[[12, 44], 1] = torch.tensor([0.5, 3.0])
    acts[:, 3] = torch.rand(48, generator=g).round(decimals=1) * (torch.rand(48, generator=g) > 0.5)
    acts[:, 4] = torch.rand(48, generator=g) + 0.01
    acts[17] = 100.0
    kept = torch.ones(48, dtype=torch.bool)
    kept[17] = False
    return acts, kept


def _collect(acts, kept, batch_contexts, n_top=3, n_samples=3, before=2, after=1, seed=0):
    c = FeatureCollector(acts.shape[1], n_top, n_samples, before, after, ctx_len=8, seed=seed)
    rows = 8 * batch_contexts
    for first in range(0, len(acts), rows):
        c.update(first, acts[first : first + rows], kept[first : first + rows])
    return c.result()


def _reference_top(acts, kept, latent, n, key):
    """The n firings of ``latent`` with the largest key, earlier row first among equal keys."""
    rows = [r for r in range(len(acts)) if kept[r] and acts[r, latent] > 0]
    return sorted(rows, key=lambda r: (-key(r), r))[:n]


def _reference_window(acts, kept, row, latent, before=2, after=1):
    ctx, pos = divmod(row, 8)
    out = []
    for q in range(pos - before, pos + after + 1):
        inside = 0 <= q < 8 and kept[ctx * 8 + q]
        out.append(float(acts[ctx * 8 + q, latent]) if inside else float("nan"))
    return out


@pytest.mark.parametrize("batch_contexts", [1, 2, 6])
def test_top_n_matches_dense_reference(batch_contexts) -> None:
    """Per latent, the top-3 rows by activation are those of a sort of the dense column
    (ties: earlier row first, so latent 0 keeps rows 3, 9, 20 of its four 2.0s), a latent with
    2 firings keeps 2 (empty slots: row -1), a silent one none; the windows hold the latent's
    activations around each firing (NaN outside the context and at the excluded row 17); firing
    counts, sums and token counts as on the dense matrix; whatever the batching."""
    acts, kept = _dense_case()
    stats = _collect(acts, kept, batch_contexts)
    assert stats.top_rows[0].tolist() == [3, 9, 20]
    assert stats.top_rows[1].tolist() == [44, 12, -1]
    assert stats.top_rows[2].tolist() == [-1, -1, -1]
    masked = torch.where(kept[:, None], acts, 0.0)
    for latent in range(5):
        ref = _reference_top(acts, kept, latent, 3, lambda r, i=latent: float(acts[r, i]))
        got = [r for r in stats.top_rows[latent].tolist() if r >= 0]
        assert got == ref, latent
        assert stats.top_values[latent, : len(ref)].tolist() == [
            float(acts[r, latent]) for r in ref
        ]
        for slot, r in enumerate(ref):
            np.testing.assert_array_equal(
                stats.top_windows[latent, slot].numpy(),
                np.array(_reference_window(acts, kept, r, latent), dtype=np.float32),
            )
    assert stats.fire_counts.tolist() == (masked > 0).sum(0).tolist()
    torch.testing.assert_close(stats.act_sums, masked.double().sum(0))
    assert (stats.n_tokens, stats.n_excluded) == (47, 1)


def test_samples_are_the_smallest_hash_keys() -> None:
    """The random firings are the firings with the smallest :func:`sample_keys` (a uniform
    sample without replacement), all of them when a latent fires at most n_samples times, the
    same for every batching, and another seed draws another sample."""
    acts, kept = _dense_case()
    one, six = _collect(acts, kept, 1), _collect(acts, kept, 6)
    assert torch.equal(one.sample_rows, six.sample_rows)
    for latent in range(5):

        def key(r, i=latent):
            return -float(sample_keys(torch.tensor([r]), torch.tensor([i]), 5, seed=0))

        ref = _reference_top(acts, kept, latent, 3, key)
        assert [r for r in one.sample_rows[latent].tolist() if r >= 0] == ref
    assert sorted(one.sample_rows[1].tolist()) == [-1, 12, 44]  # both firings
    other = _collect(acts, kept, 2, seed=1)
    assert not torch.equal(other.sample_rows[4], one.sample_rows[4])


def test_sample_keys_are_uniform() -> None:
    """The hash keys of 100,000 firings are uniform on [0, 1): each decile holds 10% ± 0.5%."""
    rows = torch.arange(100_000)
    keys = sample_keys(rows // 7, rows % 7, 7, seed=3)
    assert 0 <= float(keys.min()) and float(keys.max()) < 1
    deciles = torch.histc(keys.float(), bins=10, min=0, max=1) / len(keys)
    assert torch.all((deciles - 0.1).abs() < 0.005), deciles


def test_histogram_matches_numpy() -> None:
    """Each latent's histogram equals numpy's histogram of its kept positive activations on
    :func:`hist_edges` (values beyond the range in the end bins)."""
    acts, kept = _dense_case()
    acts[0, 3] = 1e-6  # below the lowest edge: first bin
    stats = _collect(acts, kept, 2)
    edges = hist_edges()
    for latent in range(5):
        col = acts[kept, latent]
        vals = np.clip(col[col > 0].double().numpy(), edges[0], edges[-1] * 0.999)
        ref, _ = np.histogram(vals, bins=edges)
        assert stats.hist[latent].tolist() == ref.tolist(), latent
    assert int(hist_bin(torch.tensor([1.0]))) == -hist_edges_index_of_one()
    assert stats.hist.shape == (5, HIST_BINS)


def hist_edges_index_of_one() -> int:
    """Minus the bin of activation 1.0: 1.0 = 2^0 starts bin (0 - HIST_LOG2_MIN) * bins/octave."""
    from saelab.browse.collect import HIST_BINS_PER_OCTAVE, HIST_LOG2_MIN

    return HIST_LOG2_MIN * HIST_BINS_PER_OCTAVE


def test_collector_rejects_partial_contexts() -> None:
    c = FeatureCollector(3, 2, 2, 1, 1, ctx_len=8, seed=0)
    with pytest.raises(ValueError, match="whole contexts"):
        c.update(0, torch.zeros(12, 3), torch.ones(12, dtype=torch.bool))


# --------------------------------------------------------------------------- lens, neighbours


def test_logit_lens_is_norm_then_unembedding(tiny_llama_dir) -> None:
    """On the tiny Llama (RMSNorm, tied embeddings), each latent's promoted / suppressed tokens
    are the largest / smallest entries of ``lm_head(norm(W_dec[i]))`` computed directly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    W_dec = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    top_ids, top_v, bot_ids, bot_v = logit_lens(model, W_dec, n=4, chunk=2)
    with torch.no_grad():
        direct = model.lm_head(model.model.norm(W_dec))
    ref_top, ref_bot = direct.topk(4, dim=1), direct.topk(4, dim=1, largest=False)
    assert torch.equal(top_ids, ref_top.indices) and torch.equal(bot_ids, ref_bot.indices)
    torch.testing.assert_close(top_v, ref_top.values)
    torch.testing.assert_close(bot_v, ref_bot.values)


def test_logit_lens_drops_the_layernorm_bias(tiny_gpt2_dir) -> None:
    """On the tiny GPT-2 (LayerNorm with a bias), the lens is ``lm_head`` of the centred,
    scaled direction times the norm's weight, without the bias every input gets alike."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ln = model.transformer.ln_f
    with torch.no_grad():
        ln.bias.normal_(generator=torch.Generator().manual_seed(4))  # make the bias matter
    W_dec = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    top_ids, top_v, _, _ = logit_lens(model, W_dec, n=5)
    with torch.no_grad():
        centred = W_dec - W_dec.mean(1, keepdim=True)
        scaled = centred / (centred.pow(2).mean(1, keepdim=True) + ln.eps).sqrt() * ln.weight
        ref = model.lm_head(scaled).topk(5, dim=1)
    assert torch.equal(top_ids, ref.indices)
    torch.testing.assert_close(top_v, ref.values, rtol=1e-4, atol=1e-4)


def test_nearest_by_cosine_matches_brute_force() -> None:
    """Neighbours are the argsort of the full cosine matrix (itself excluded), in any chunking;
    a row's own copy in another SAE is its nearest latent there with cosine 1."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(30, 8, generator=g)
    idx, cos = nearest_by_cosine(W, W, 3, exclude_self=True, chunk=7)
    full = torch.nn.functional.cosine_similarity(W[:, None], W[None], dim=-1)
    full.fill_diagonal_(-2)
    ref = full.topk(3, dim=1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(cos, ref.values)
    perm = torch.randperm(30, generator=g)
    other_idx, other_cos = nearest_by_cosine(W, 2.5 * W[perm], 1, exclude_self=False)
    assert torch.equal(perm[other_idx[:, 0]], torch.arange(30))
    torch.testing.assert_close(other_cos[:, 0], torch.ones(30))


# --------------------------------------------------------------------------- escaping

PAYLOAD = (
    "</script><script>document.body.dataset.pwned = 1</script>"
    '<img src=x onerror="document.body.dataset.pwned = 2">'
)


def test_data_files_keep_corpus_text_inert(tmp_path) -> None:
    """A data file is one ``SAELAB.receive`` call whose argument is JSON that gives back the
    corpus text exactly, in ASCII with no raw ``<``-tag, quote or newline that could end the
    string; the templates autoescape what they render."""
    write_data(
        tmp_path / "d.js", "vocab", {"variant": "topk", "tokens": {"7": PAYLOAD + "\n\u2028"}}
    )
    text = (tmp_path / "d.js").read_text(encoding="ascii")
    m = re.fullmatch(r'SAELAB\.receive\("vocab",(.*)\);\n', text, flags=re.S)
    assert m and json.loads(m.group(1))["tokens"]["7"] == PAYLOAD + "\n\u2028"
    assert "\n" not in m.group(1) and "\u2028" not in text
    html = environment().from_string("{{ x }}", globals={}).render(x=PAYLOAD)
    assert "<script>" not in html and "&lt;script&gt;" in html


# --------------------------------------------------------------------------- the page in Chromium

PLANTED_TEXT = " see <script>alert(1)</script> here"
PLANTED_LATENT = 5
D_IN, D_SAE, CTX, N_CTX = 64, 32, 16, 8


@pytest.fixture(scope="module")
def tiny_pages(tmp_path_factory, tiny_llama_dir):
    """A tiny pipeline's feature pages, built by ``saelab features`` / ``features-index``:
    eval tokens of real text (SmolLM2's tokenizer) with the untrusted ``PLANTED_TEXT`` in
    context 3, random activations plus a large component along u at the ``script`` token of
    that context, and a TopK SAE whose latent PLANTED_LATENT reads u."""
    from transformers import AutoTokenizer

    from saelab.data import write_tokens
    from saelab.sae import build_sae
    from saelab.store import ActivationWriter

    root = tmp_path_factory.mktemp("browse")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"][: N_CTX * CTX], np.int32)
    ids = ids.reshape(N_CTX, CTX)
    planted = tok(PLANTED_TEXT, add_special_tokens=False)["input_ids"]
    ids[3, 4 : 4 + len(planted)] = planted
    pos = 4 + next(j for j, t in enumerate(planted) if tok.decode([t]) == "script")
    write_tokens(root / "tokens", {"train": ids, "eval": ids}, {"tokenizer": str(tiny_llama_dir)})

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_CTX * CTX, D_IN, generator=g)
    u = torch.nn.functional.normalize(torch.randn(D_IN, generator=g), dim=0)
    x[3 * CTX + pos] += 20 * u
    x[2 * CTX + 7] += 12 * u  # the second-best context
    acts_dir = root / "activations"
    with ActivationWriter(acts_dir / "eval", N_CTX * CTX, D_IN, "float32", "none", 0, 64,
                          {"ctx_len": CTX}) as w:  # fmt: skip
        w.write(x)
    sae = build_sae("topk", D_IN, D_SAE, 4, {}, torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc[:, PLANTED_LATENT] = u
    for variant in ("topk", "batchtopk"):
        sae_v = sae if variant == "topk" else build_sae("batchtopk", D_IN, D_SAE, 4, {}, g)
        sae_v.save(root / "models" / variant, {
            "hookpoint": "blocks.2.hook_resid_pre", "max_norm": 1e6,
            "model": recorded_path(str(tiny_llama_dir), root),  # as train records it
        })  # fmt: skip

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["variants"] = ["topk", "batchtopk"]
    params["sae"]["d_sae"] = D_SAE
    params["k"] = 4
    params["model"].update(name_or_path=str(tiny_llama_dir), gguf_file=None,
                           hookpoint="blocks.2.hook_resid_pre")  # fmt: skip
    params["data"]["corpus_dirs"] = [str(root)]
    params["features"].update(n_top=3, n_samples=4, batch_contexts=3, context_after=8)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for variant in ("topk", "batchtopk"):
        paths = ["--tokens", "tokens", "--activations", "activations"]
        _saelab(root, "features", "--variant", variant, *paths, "--sae", f"models/{variant}",
                "--out", f"features/{variant}")  # fmt: skip
    _saelab(root, "features-index", "--models", "models", "--out", "features/compare")
    return root / "features", tok.decode([int(ids[3, pos])]), pos


def _saelab(root: Path, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saelab.cli", *args, "--params", "params.yaml"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


class _Dom(HTMLParser):
    """The elements of a dumped DOM: (tag, attrs, text directly inside) in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        e = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": list(self._open)}
        self.elements.append(e)
        if tag not in ("img", "input", "br", "meta", "link"):
            self._open.append(e)

    def handle_endtag(self, tag):
        while self._open and self._open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for e in self._open:
            e["text"] += data

    def by_id(self, id_: str) -> dict:
        return next(e for e in self.elements if e["attrs"].get("id") == id_)

    def inside(self, id_: str, tag: str | None = None, cls: str | None = None) -> list[dict]:
        box = self.by_id(id_)
        return [e for e in self.elements if box in e["parents"]
                and (tag is None or e["tag"] == tag)
                and (cls is None or cls in e["attrs"].get("class", "").split())]  # fmt: skip


def _chromium(url: str, *flags: str) -> str:
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         *flags, url], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_page_in_headless_chromium(tiny_pages, tmp_path) -> None:
    """Headless Chromium opens the generated pages from file://: the index lists all D_SAE
    latents; the planted latent's first top context is context 3 with the ``script`` token
    highlighted, and its text shows the corpus's ``<script>`` tag as text (no element made from
    it, nothing run: the body has no ``data-pwned``); the cross-variant link and page load. A
    screenshot of the latent page is saved next to the pages."""
    pages, script_token, pos = tiny_pages
    index = _Dom()
    index.feed(_chromium((pages / "topk" / "index.html").as_uri(), "--dump-dom"))
    assert index.by_id("n-latents")["text"] == str(D_SAE)
    assert len(index.inside("index", "tr")) == D_SAE + 1  # header row + one per latent
    assert index.by_id("row-count")["text"].startswith(f"{D_SAE} latents")

    url = (pages / "topk" / "index.html").as_uri() + f"#latent={PLANTED_LATENT}"
    dom = _Dom()
    dom.feed(_chromium(url, "--dump-dom"))
    assert dom.by_id("latent-title")["text"].startswith(f"topk latent #{PLANTED_LATENT}")
    contexts = dom.inside("top-contexts", "div", "ctx")
    assert len(contexts) == 3
    first = contexts[0]
    assert [h["text"] for h in dom.inside("top-contexts", cls="hit")][:1] == [script_token]
    assert f"ctx 3, pos {pos}" in first["text"]
    assert "<script>alert(1)</script>" in first["text"]
    assert "ctx 2, pos 7" in contexts[1]["text"]
    assert not dom.inside("app", "script") and not dom.inside("app", "img")
    body = next(e for e in dom.elements if e["tag"] == "body")
    assert "data-pwned" not in body["attrs"]
    other = dom.by_id("other-variants")["text"]
    assert "batchtopk #" in other

    compare = _Dom()
    compare.feed(_chromium((pages / "compare" / "index.html").as_uri(), "--dump-dom"))
    assert len(compare.inside("matches", "tr")) == D_SAE + 1

    shot = pages.parent / "latent.png"
    _chromium(url, f"--screenshot={shot}", "--window-size=1200,1400")
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, tmp_path / "latent.png")


def test_browse_serves_the_pages(tiny_pages) -> None:
    """``saelab browse``'s server, bound to 127.0.0.1, redirects / to the cross-variant page
    and serves the variant pages and their data."""
    import threading
    import urllib.request

    from saelab.browse.serve import make_server

    pages = tiny_pages[0]
    server = make_server(pages, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://{host}:{port}/") as r:
            assert r.url.endswith("/compare/index.html") and b'data-page="compare"' in r.read()
        with urllib.request.urlopen(f"http://{host}:{port}/topk/data/index.js") as r:
            assert r.read().startswith(b'SAELAB.receive("index",')
    finally:
        server.shutdown()
        server.server_close()


def test_features_rejects_another_variant(tiny_pages) -> None:
    """``saelab features --variant batchtopk`` on a TopK SAE: one line, exit 2, no output."""
    root = tiny_pages[0].parent
    result = subprocess.run(
        [sys.executable, "-m", "saelab.cli", "features", "--params", "params.yaml", "--variant",
         "batchtopk", "--tokens", "tokens", "--activations", "activations", "--sae",
         "models/topk", "--out", "features/wrong"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("saelab: error: --sae models/topk")
    assert not (root / "features" / "wrong").exists()


@pytest.mark.parametrize("variant", ["batchtopk", "switch"])
def test_collect_features_matches_the_dense_code(tiny_pages, variant) -> None:
    """collect_features over a store equals the top-N of the SAE's dense eval-mode code of all
    kept rows (BatchTopK: its global threshold, so a token's code does not depend on its block;
    Switch: routed), position 0 and rows above max_norm excluded; Switch counts the kept tokens
    routed to each expert."""
    from saelab.browse.collect import collect_features
    from saelab.sae import build_sae
    from saelab.store import ActivationStore

    store_path = tiny_pages[0].parent / "activations" / "eval"
    store = ActivationStore(store_path)
    x = store.read(0, store.n_tokens)
    hparams = {"n_experts": 4, "balance_coef": 3.0} if variant == "switch" else {}
    sae = build_sae(variant, D_IN, D_SAE, 4, hparams, torch.Generator().manual_seed(5))
    if variant == "batchtopk":
        sae.activation.threshold.fill_(0.5)
    sae.metadata = {"max_norm": float(x.norm(dim=-1).quantile(0.95))}
    kept = store.keep_mask(0, store.n_tokens) & (x.norm(dim=-1) <= sae.metadata["max_norm"])
    stats = collect_features(sae, store_path, n_top=3, n_samples=2, before=1, after=1,
                             batch_contexts=3, exclude_first_position=True, seed=0)  # fmt: skip
    with torch.no_grad():
        dense = torch.zeros(len(x), D_SAE)
        dense[kept] = sae.eval()(x[kept]).acts
    assert stats.n_tokens == int(kept.sum())
    assert stats.fire_counts.tolist() == (dense > 0).sum(0).tolist()
    for latent in range(D_SAE):
        col = dense[:, latent]
        ref = _reference_top(dense, kept, latent, 3, lambda r, c=col: float(c[r]))
        assert [r for r in stats.top_rows[latent].tolist() if r >= 0] == ref
        torch.testing.assert_close(stats.top_values[latent, : len(ref)], col[ref])
    if variant == "switch":
        routed = sae.route(x[kept])[1]
        assert stats.expert_counts.tolist() == torch.bincount(routed, minlength=4).tolist()
    else:
        assert stats.expert_counts is None
