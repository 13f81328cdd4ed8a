// saelab feature browser. No network, no library. Corpus text is untrusted: it only ever
// reaches the page through textContent / title properties, never innerHTML.
"use strict";

const SAELAB = (() => {
  const store = { meta: null, index: {}, vocab: {}, shard: {}, pair: {}, variants: null };
  const waiting = {};  // script src -> [resolve]
  const MAX_ROWS = 1000;

  function receive(kind, payload) {
    if (kind === "meta" || kind === "variants") store[kind] = payload;
    else if (kind === "index") store.index[payload.variant] = payload;
    else if (kind === "vocab") store.vocab[payload.variant] = payload.tokens;
    else if (kind === "shard") store.shard[payload.variant + "/" + payload.first] = payload;
    else if (kind === "pair") store.pair[payload.a + "/" + payload.b] = payload;
  }

  function load(src) {  // a data file by <script>: works from file:// (fetch does not)
    return new Promise((resolve) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = () => resolve(true);
      s.onerror = () => resolve(false);
      document.head.appendChild(s);
    });
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  // Whitespace made visible in token lists; in contexts only newlines and tabs.
  function visible(s) {
    return s.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function inContext(s) { return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
  function tokenOf(variant, id) {
    const s = (store.vocab[variant] || {})[String(id)];
    return s === undefined ? "<" + id + ">" : s;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "\u2013";
    return Number(x).toPrecision(digits || 3);
  }
  function pct(x) { return x === null ? "\u2013" : (100 * x).toPrecision(3) + "%"; }

  // ------------------------------------------------------------------ variant page
  function flags(ix, i) {
    if (ix.fires[i] === 0) return "dead";
    if (ix.density[i] > ix.dense_frequency) return "dense";
    return "";
  }

  function indexView(app) {
    const meta = store.meta, ix = store.index[meta.variant];
    const state = { sort: "density", desc: true, query: "", show: "all", expert: "all" };
    const search = el("input", { type: "search", id: "search", placeholder: "token or #latent" });
    const show = el("select", { id: "show" },
      ...["all", "live", "dead", "dense"].map((o) => el("option", { value: o, text: o })));
    const controls = el("div", { class: "controls" }, "search ", search, " show ", show);
    let expertSelect = null;
    if (ix.expert) {
      expertSelect = el("select", { id: "expert" }, el("option", { value: "all", text: "all" }),
        ...Array.from({ length: meta.n_experts }, (_, e) => el("option", { value: e, text: e })));
      controls.append(" expert ", expertSelect);
    }
    const count = el("span", { id: "row-count" });
    controls.append(" ", count);
    const columns = [["id", "latent"], ["expert", "expert"], ["density", "density"],
      ["max", "max act"], ["mean", "mean act"], [null, "top-context tokens"],
      [null, "promotes"], [null, ""]].filter(([k]) => k !== "expert" || ix.expert);
    const thead = el("tr");
    for (const [key, label] of columns) {
      const th = el("th", { text: label });
      if (key) {
        th.className = "sortable";
        th.addEventListener("click", () => {
          state.desc = state.sort === key ? !state.desc : key !== "id" && key !== "expert";
          state.sort = key;
          render();
        });
      }
      thead.append(th);
    }
    const tbody = el("tbody");
    const table = el("table", { id: "index" }, el("thead", {}, thead), tbody);
    const v = meta.variant;
    const tokensText = ix.top_tokens.map((ts) => ts.map((t) => tokenOf(v, t)));
    const promoteText = ix.promote.map((ts) => ts.map((t) => tokenOf(v, t)));

    function matches(i, q) {
      if (q.startsWith("#")) return String(i) === q.slice(1);
      return tokensText[i].some((s) => s.toLowerCase().includes(q)) ||
        promoteText[i].some((s) => s.toLowerCase().includes(q));
    }
    function render() {
      const q = state.query.toLowerCase();
      let ids = [...Array(meta.d_sae).keys()].filter((i) => {
        const f = flags(ix, i);
        if (state.show === "live" && f === "dead") return false;
        if ((state.show === "dead" || state.show === "dense") && f !== state.show) return false;
        if (state.expert !== "all" && ix.expert[i] !== Number(state.expert)) return false;
        return q === "" || matches(i, q);
      });
      const key = state.sort;
      const val = (i) => key === "id" ? i : key === "expert" ? ix.expert[i] * 1e9 + i : ix[key][i];
      ids.sort((a, b) => (state.desc ? val(b) - val(a) : val(a) - val(b)) || a - b);
      count.textContent = ids.length + " latents" +
        (ids.length > MAX_ROWS ? ", first " + MAX_ROWS + " shown" : "");
      tbody.replaceChildren(...ids.slice(0, MAX_ROWS).map((i) => {
        const f = flags(ix, i);
        const cells = [el("td", {}, el("a", { href: "#latent=" + i, text: "#" + i }))];
        if (ix.expert) cells.push(el("td", { text: ix.expert[i] }));
        cells.push(el("td", { text: pct(ix.density[i]) }), el("td", { text: fmt(ix.max[i]) }),
          el("td", { text: fmt(ix.mean[i]) }),
          el("td", { class: "toks" }, ...tokensText[i].map((s) => el("span", { class: "tk", text: visible(s) }))),
          el("td", { class: "toks" }, ...promoteText[i].map((s) => el("span", { class: "tk", text: visible(s) }))),
          el("td", { class: "flag " + f, text: f }));
        return el("tr", { class: f, "data-latent": i }, ...cells);
      }));
    }
    search.addEventListener("input", () => { state.query = search.value.trim(); render(); });
    show.addEventListener("change", () => { state.show = show.value; render(); });
    if (expertSelect) expertSelect.addEventListener("change", () => { state.expert = expertSelect.value; render(); });
    app.replaceChildren(densityPlot(ix), controls, table);
    render();
  }

  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  }

  function bars(counts, labels, title, width, height) {  // a bar chart; labels: [[bin, text]]
    const plot = svg("svg", { width, height: height + 30, class: "plot" });
    const max = Math.max(1, ...counts), w = width / Math.max(1, counts.length);
    counts.forEach((c, b) => {
      const h = (height * c) / max;
      const r = svg("rect", { x: b * w, y: height - h, width: Math.max(1, w - 1), height: h });
      const t = svg("title", {});
      t.textContent = labels.tip(b) + ": " + c;
      r.append(t);
      plot.append(r);
    });
    for (const [b, text] of labels.ticks) {
      const t = svg("text", { x: b * w, y: height + 14 });
      t.textContent = text;
      plot.append(t);
    }
    const cap = svg("text", { x: 0, y: height + 28, class: "caption" });
    cap.textContent = title;
    plot.append(cap);
    return plot;
  }

  function densityPlot(ix) {
    const n = store.meta.n_tokens, lo = Math.floor(Math.log10(1 / Math.max(n, 1)));
    const perDecade = 4, nBins = -lo * perDecade, counts = new Array(nBins).fill(0);
    for (const d of ix.density) {
      if (d > 0) counts[Math.min(nBins - 1, Math.max(0, Math.floor((Math.log10(d) - lo) * perDecade)))]++;
    }
    const ticks = [];
    for (let b = 0; b < nBins; b += perDecade) ticks.push([b, "1e" + (lo + b / perDecade)]);
    return el("div", { class: "density" }, bars(counts, {
      ticks, tip: (b) => "1e" + (lo + b / perDecade).toFixed(2),
    }, "firing density of the live latents (log10 fraction of tokens)", 480, 80));
  }

  function context(ex, maxAct, v) {
    const div = el("div", { class: "ctx" });
    div.append(el("span", { class: "val", text: fmt(ex.value) }));
    ex.tok.forEach((t, j) => {
      const a = ex.act[j], s = tokenOf(v, t);
      const span = el("span", { class: "tok" + (j === ex.at ? " hit" : "") + (a === null ? " excl" : ""),
        text: inContext(s) });
      span.title = visible(s) + "  \u00b7  " + (a === null ? "excluded (not encoded)" : "act " + fmt(a));
      if (a) span.style.backgroundColor = "rgba(255, 120, 0, " + Math.min(1, a / maxAct).toFixed(3) + ")";
      div.append(span);
    });
    div.append(el("span", { class: "where", text: "ctx " + ex.ctx + ", pos " + (ex.pos + ex.at) }));
    return div;
  }

  function tokenList(pairs, v) {
    return el("table", { class: "logits" }, ...pairs.map(([t, x]) =>
      el("tr", {}, el("td", { class: "tk", text: visible(tokenOf(v, t)) }), el("td", { text: fmt(x) }))));
  }

  async function latentView(app, i) {
    const meta = store.meta, ix = store.index[meta.variant], v = meta.variant;
    if (!(i >= 0 && i < meta.d_sae)) { app.replaceChildren(el("p", { text: "no latent " + i })); return; }
    const first = Math.floor(i / meta.shard_size) * meta.shard_size;
    const key = v + "/" + first;
    if (!store.shard[key]) await load("data/shard_" + String(first / meta.shard_size).padStart(4, "0") + ".js");
    const rec = store.shard[key].latents[i - first];
    const f = flags(ix, i);
    const nav = el("p", { class: "latnav" }, el("a", { href: "#", text: "\u2190 index" }), " ",
      i > 0 ? el("a", { href: "#latent=" + (i - 1), text: "#" + (i - 1) }) : null, " ",
      i + 1 < meta.d_sae ? el("a", { href: "#latent=" + (i + 1), text: "#" + (i + 1) }) : null);
    const head = el("h2", { id: "latent-title", text: v + " latent #" + i + (f ? " (" + f + ")" : "") +
      (ix.expert ? ", expert " + ix.expert[i] : "") });
    const stats = el("p", { class: "stats", text: "fires on " + rec.fires + " of " + meta.n_tokens +
      " tokens (density " + pct(ix.density[i]) + "); max act " + fmt(ix.max[i]) + ", mean act " + fmt(ix.mean[i]) });
    const maxAct = ix.max[i] || 1;
    const top = el("div", { id: "top-contexts" }, ...rec.top.map((ex) => context(ex, maxAct, v)));
    const samples = el("div", { id: "samples" }, ...rec.samples.map((ex) => {
      const d = context(ex, maxAct, v);
      d.prepend(el("span", { class: "pct", text: "p" + Math.round(ex.pct) }));
      return d;
    }));
    const [b0, counts] = rec.hist;
    const ticks = [];
    counts.forEach((_, b) => {
      const e = (b0 + b) / meta.hist_bins_per_octave + meta.hist_log2_min;
      if (Number.isInteger(e) && (counts.length < 24 || e % 2 === 0)) ticks.push([b, fmt(2 ** e, 2)]);
    });
    const hist = counts.length ? bars(counts, {
      ticks, tip: (b) => "from " + fmt(2 ** ((b0 + b) / meta.hist_bins_per_octave + meta.hist_log2_min)),
    }, "activations when firing (log2 bins of 1/" + meta.hist_bins_per_octave + " octave)", 480, 80) : el("p", { text: "never fires" });
    const neighbours = el("p", { class: "neighbours" }, ...rec.neighbours.flatMap(([j, c]) =>
      [el("a", { href: "#latent=" + j, text: "#" + j }), el("span", { class: "cos", text: " " + fmt(c, 2) + "  " })]));
    const others = el("div", { id: "other-variants" });
    app.replaceChildren(nav, head, stats,
      el("div", { class: "cols" },
        el("div", {}, el("h3", { text: "activation histogram" }), hist),
        el("div", {}, el("h3", { text: "promotes (logit lens)" }), tokenList(rec.promote, v)),
        el("div", {}, el("h3", { text: "suppresses" }), tokenList(rec.suppress, v))),
      el("h3", { text: "nearest latents by decoder cosine" }), neighbours, others,
      el("h3", { text: "top-activating contexts (hover a token for its activation)" }), top,
      el("h3", { text: "random firings, weakest first (pN: percentile among this latent's firings)" }), samples);
    crossVariant(others, i);
  }

  async function crossVariant(box, i) {  // nearest latents in the other variants, if built
    const v = store.meta.variant;
    for (const o of store.meta.variants) {
      if (o === v) continue;
      const key = v + "/" + o;
      if (!store.pair[key] && !(await load("../compare/data/pair_" + v + "_" + o + ".js"))) continue;
      const p = store.pair[key];
      if (!p) continue;
      if (!box.firstChild) box.append(el("h3", { text: "nearest latent in the other variants" }));
      box.append(el("span", { class: "other" }, o + " ",
        el("a", { href: "../" + o + "/index.html#latent=" + p.nearest[i], text: "#" + p.nearest[i] }),
        " cos " + fmt(p.cos[i], 2) + (p.mutual[i] ? " (mutual)" : "") + "   "));
    }
  }

  function route() {
    const app = document.getElementById("app");
    const m = /^#latent=(\d+)$/.exec(location.hash);
    if (m) latentView(app, Number(m[1]));
    else indexView(app);
    window.scrollTo(0, 0);
  }

  // ------------------------------------------------------------------ compare page
  async function compareView(app) {
    const vs = store.variants.variants;
    const selA = el("select", { id: "var-a" }, ...vs.map((v) => el("option", { value: v, text: v })));
    const selB = el("select", { id: "var-b" }, ...vs.map((v) => el("option", { value: v, text: v })));
    if (vs.length > 1) selB.value = vs[1];
    const out = el("div", { id: "pair" });
    app.replaceChildren(el("p", { class: "controls" }, "A ", selA, "  B ", selB), out);
    async function show() {
      const a = selA.value, b = selB.value;
      if (a === b) { out.replaceChildren(el("p", { text: "pick two different variants" })); return; }
      for (const v of [a, b]) {
        if (!store.index[v]) { await load("../" + v + "/data/index.js"); await load("../" + v + "/data/vocab.js"); }
      }
      if (!store.pair[a + "/" + b]) await load("data/pair_" + a + "_" + b + ".js");
      const p = store.pair[a + "/" + b];
      const ia = store.index[a], ib = store.index[b];
      const toks = (ix, v, j) => ix ? ix.top_tokens[j].map((t) => visible(tokenOf(v, t))).join("  ") : "";
      const ids = [...p.nearest.keys()].sort((x, y) => p.cos[y] - p.cos[x] || x - y).slice(0, MAX_ROWS);
      const rows = ids.map((i) => el("tr", {},
        el("td", {}, el("a", { href: "../" + a + "/index.html#latent=" + i, text: a + " #" + i })),
        el("td", { class: "toks", text: toks(ia, a, i) }),
        el("td", { text: fmt(p.cos[i], 3) + (p.mutual[i] ? " \u2194" : "") }),
        el("td", {}, el("a", { href: "../" + b + "/index.html#latent=" + p.nearest[i], text: b + " #" + p.nearest[i] })),
        el("td", { class: "toks", text: toks(ib, b, p.nearest[i]) })));
      out.replaceChildren(el("p", { text: "each " + a + " latent and its nearest " + b +
        " latent by decoder cosine (\u2194: mutual nearest), best matches first; " +
        (ids.length < p.nearest.length ? "first " + ids.length + " of " + p.nearest.length : "") }),
        el("table", { id: "matches" }, el("tr", {}, ...["A", "A top tokens", "cos", "B", "B top tokens"]
          .map((t) => el("th", { text: t }))), ...rows));
    }
    selA.addEventListener("change", show);
    selB.addEventListener("change", show);
    show();
  }

  function start() {
    const page = document.body.dataset.page;
    if (page === "variant") {
      window.addEventListener("hashchange", route);
      route();
    } else if (page === "compare") {
      compareView(document.getElementById("app"));
    }
  }
  window.addEventListener("load", start);
  return { receive, store };
})();
