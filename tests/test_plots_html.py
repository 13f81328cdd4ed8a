"""`dvc plots show` / `dvc plots diff` pages render with no network: the project's
`.dvc/config` points DVC at the template of scripts/plots_template.py (Vega inlined), and headless
Chromium, with every host unresolvable, draws each plot's marks from the committed plot data.
Needs a Chromium (`apt-get install chromium`; .ci/run installs it); skipped without one, except
under CI, where a missing browser fails."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
NO_NETWORK = ("--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND")


def _browser() -> str:
    found = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if found is None:
        reason = f"no headless browser ({', '.join(BROWSERS)}); apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _run(repo: Path, *cmd: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update(
        GIT_AUTHOR_NAME="saelab-test", GIT_AUTHOR_EMAIL="test@saelab.invalid",
        GIT_COMMITTER_NAME="saelab-test", GIT_COMMITTER_EMAIL="test@saelab.invalid",
    )  # fmt: skip
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def _dvc(repo: Path, *args: str) -> str:
    return _run(repo, str(Path(sys.executable).parent / "dvc"), *args)


def _dom(browser: str, page: Path, profile: Path) -> str:
    """The DOM of ``page`` after 15 s of virtual time in headless Chromium, offline."""
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         *NO_NETWORK, "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _plot_sections(dom: str, plot_ids: list[str]) -> dict[str, str]:
    """Each plot's part of the DOM: from its ``<div id=...>`` to the next plot's."""
    starts = [dom.index(f'<div id="{pid}"') for pid in plot_ids]
    ends = [*starts[1:], len(dom)]
    return {pid: dom[s:e] for pid, s, e in zip(plot_ids, starts, ends, strict=True)}


def _drawn(section: str, mark: str) -> int:
    """Data marks Vega drew (SVG renderer: one aria-labelled element per point / line)."""
    return len(re.findall(rf'role="graphics-symbol" aria-roledescription="{mark}"', section))


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repo with the project's dvc.yaml, params.yaml, .dvc/config, plot templates
    and committed plot data, and the HTML template made by scripts/plots_template.py where
    .dvc/config says."""
    repo = tmp_path_factory.mktemp("plots-repo")
    for name in ("dvc.yaml", "params.yaml"):  # dvc.yaml's foreach reads params.yaml's variants
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "plots" / "templates", repo / "plots" / "templates")
    for name in ("pareto.json", "l0_hist.json", "density_hist.json"):
        shutil.copy(REPO / "plots" / name, repo / "plots" / name)
    shutil.copytree(REPO / "reports" / "main" / "fronts", repo / "reports" / "main" / "fronts")
    _run(repo, "git", "init", "-q")
    _dvc(repo, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    template = repo / ".dvc" / _dvc(repo, "config", "plots.html_template").strip()
    _run(repo, sys.executable, str(REPO / "scripts" / "plots_template.py"), "--out", str(template))
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "plots")
    return repo


STUDY_PLOTS = {
    "study_l0_fvu": "reports/main/fronts/pareto_l0_fvu.json",
    "study_sampled_l_fvu": "reports/main/fronts/sampled_l_fvu.json",
}


def _plot_ids() -> list[str]:
    return [next(iter(p)) for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]]


def test_dvc_plots_show_renders_offline(plots_repo: Path, tmp_path: Path) -> None:
    """`dvc plots show` with no flags writes a page without CDN scripts on which offline
    Chromium draws every plot: one point per pareto.json row in both Pareto plots, a line per
    variant in each histogram, a point per record and a line per line label in the study's
    fronts (reports/main/fronts/, committed by the report stage). DVC's default page, rendered
    the same way, draws nothing."""
    browser = _browser()
    _dvc(plots_repo, "plots", "show")
    page = plots_repo / "dvc_plots" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    plot_ids = _plot_ids()
    sections = _plot_sections(_dom(browser, page, tmp_path / "profile"), plot_ids)
    rows = json.loads((plots_repo / "plots" / "pareto.json").read_text())
    variants = sorted({r["variant"] for r in rows})
    for pid in ("pareto_l0_fvu", "pareto_l0_delta_ce"):
        assert _drawn(sections[pid], "point") == len(rows), pid
    for pid in ("l0_hist", "density_hist"):
        assert _drawn(sections[pid], "line mark") == len(variants), pid
    fvu = {r["variant"]: r["fvu"] for r in rows}
    for v in variants:  # the points are the data's: the tooltip label carries the value
        assert (
            f"unexplained): {fvu[v]:.12g}; variant: {v}; rev: workspace"
            in sections["pareto_l0_fvu"]
        ), v

    for pid, file in STUDY_PLOTS.items():  # the study's fronts: a point per record
        points = json.loads((plots_repo / file).read_text())["points"]
        assert points and _drawn(sections[pid], "point") == len(points), pid
        assert _drawn(sections[pid], "line mark") == len({p["line"] for p in points}), pid

    default = _default_page(tmp_path)
    _dvc(plots_repo, "plots", "show", "-o", "cdn_page", "--html-template", str(default))
    cdn = _dom(browser, plots_repo / "cdn_page" / "index.html", tmp_path / "profile-cdn")
    cdn_sections = _plot_sections(cdn, plot_ids)
    assert all(_drawn(s, "point") + _drawn(s, "line mark") == 0 for s in cdn_sections.values())


def test_dvc_plots_diff_renders_offline(plots_repo: Path, tmp_path: Path) -> None:
    """`dvc plots diff HEAD` (HEAD against the workspace, one pareto value changed there) also
    renders offline, with each revision's points."""
    browser = _browser()
    pareto = plots_repo / "plots" / "pareto.json"
    committed = pareto.read_text()
    rows = json.loads(committed)
    rows[0]["fvu"] += 0.01
    pareto.write_text(json.dumps(rows))
    try:
        _dvc(plots_repo, "plots", "diff", "HEAD", "-o", "diff_page")
    finally:
        pareto.write_text(committed)
    page = plots_repo / "diff_page" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    sections = _plot_sections(_dom(browser, page, tmp_path / "profile"), _plot_ids())
    fvu_plot = sections["pareto_l0_fvu"]
    assert _drawn(fvu_plot, "point") == 2 * len(rows)
    assert "rev: HEAD" in fvu_plot and "rev: workspace" in fvu_plot


def _default_page(tmp_path: Path) -> Path:
    """DVC's own page template (the one that loads Vega from a CDN), as a file."""
    from dvc_render.html import PAGE_HTML

    path = tmp_path / "dvc-default-page.html"
    path.write_text(PAGE_HTML)
    return path
