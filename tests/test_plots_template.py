"""The page template of `dvc plots show`: src/glr/resources/plots/offline.html.

`.dvc/config` points DVC at it. It inlines vega, vega-lite and vega-embed (written by vendor.sh
next to it) so that the page draws its charts without network access, where DVC's own template
loads the three libraries from a CDN.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "src" / "glr" / "resources" / "plots" / "offline.html"
DVC_CONFIG = ROOT / ".dvc" / "config"

# npm package -> (the global its browser build defines, major version DVC's renderer expects).
LIBRARIES = {
    "vega": (".vega={}", 5),
    "vega-lite": (".vegaLite={}", 5),
    "vega-embed": (".vegaEmbed=", 6),
}
# The colour dvc-render gives the first revision's line ("#945dd6").
LINE_RGB = (0x94, 0x5D, 0xD6)


@pytest.fixture(scope="module")
def template() -> str:
    return TEMPLATE.read_text(encoding="utf8")


def _scripts(html: str) -> list[str]:
    """The bodies of the page's inline <script> elements."""
    return re.findall(r"<script>\n(.*?)</script>", html, flags=re.DOTALL)


def _library_script(html: str, package: str) -> tuple[str, str]:
    """(version, script body) of the inlined npm package, found by vendor.sh's provenance line."""
    line = re.compile(rf"npm package {re.escape(package)}@(\d+\.\d+\.\d+), file build/")
    found = [(m.group(1), body) for body in _scripts(html) if (m := line.search(body))]
    assert len(found) == 1, f"{package}: expected one inlined build, found {len(found)}"
    return found[0]


def test_template_has_dvc_placeholders(template: str) -> None:
    # dvc-render fills "{plot_divs}" and refuses a template without it. "{scripts}" is where it
    # would add its CDN <script> tags: the offline template must not offer it.
    assert template.count("{plot_divs}") == 1
    assert "{scripts}" not in template


@pytest.mark.parametrize("package", sorted(LIBRARIES))
def test_template_inlines_library(template: str, package: str) -> None:
    marker, major = LIBRARIES[package]
    version, body = _library_script(template, package)
    assert int(version.split(".")[0]) == major
    assert marker in body
    assert f'"{version}"' in body, "the build's own version string differs from its label"
    assert "license BSD-3-Clause" in body
    assert "Redistribution and use in source and binary forms" in body


def test_vendored_majors_match_dvc_render() -> None:
    vega = pytest.importorskip("dvc_render.vega")
    wanted = dict(re.findall(r"/npm/(vega(?:-lite|-embed)?)@(\d+)\.", vega.VegaRenderer.SCRIPTS))
    assert {package: int(v) for package, v in wanted.items()} == {
        package: major for package, (_, major) in LIBRARIES.items()
    }


def test_template_loads_nothing_from_the_network(template: str) -> None:
    assert re.findall(r"<script\b[^>]*>", template) == ["<script>"] * 4
    external = re.compile(r"<[a-z]+\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.I)
    assert not external.search(template)


def test_dvc_config_points_at_template() -> None:
    config = configparser.ConfigParser(interpolation=None)
    config.read(DVC_CONFIG, encoding="utf8")
    value = config.get("plots", "html_template").strip("'\"")
    # DVC resolves a relative plots.html_template against the .dvc directory.
    assert (DVC_CONFIG.parent / value).resolve() == TEMPLATE.resolve()
    # The rest of the file is someone else's, but it must survive next to [plots].
    assert config.get("core", "autostage") == "true"
    assert config.get("cache", "type").strip('"') == "reflink,hardlink,symlink"


def _render_page(out_dir: Path) -> Path:
    """A page with one Vega-Lite line chart, filled the way `dvc plots show` fills it."""
    dvc_render = pytest.importorskip("dvc_render")
    points = [{"step": i, "loss": 1.0 / (i + 1), "rev": "workspace"} for i in range(10)]
    chart = dvc_render.VegaRenderer(points, "loss.tsv", template="linear", x="step", y="loss")
    page = out_dir / "index.html"
    dvc_render.render_html([chart], page, html_template=str(TEMPLATE))
    return page


def test_rendered_page_is_self_contained(tmp_path: Path) -> None:
    html = _render_page(tmp_path).read_text(encoding="utf8")
    assert "vegaEmbed('#loss_tsv', spec)" in html
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", html)
    assert "cdn." not in html


def _near(colour: tuple[int, int, int], target: tuple[int, int, int]) -> bool:
    return all(abs(c - t) <= 40 for c, t in zip(colour, target, strict=True))


def test_chromium_draws_chart_offline(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    image = pytest.importorskip("PIL.Image")
    page = _render_page(tmp_path)
    shot = tmp_path / "shot.png"
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        # No host name resolves: a page that needs a CDN stays blank.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=800,600",
        "--virtual-time-budget=5000",
        page.as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    with image.open(shot) as picture:
        rgb = picture.convert("RGB")
        colours = rgb.getcolors(rgb.width * rgb.height) or []

    inked = sum(n for n, colour in colours if min(colour) < 200)
    line = sum(n for n, colour in colours if _near(colour, LINE_RGB))
    assert inked > 1000, f"page looks blank: {inked} non-white pixels"
    assert line > 200, f"no data line drawn: {line} pixels of the line colour"
