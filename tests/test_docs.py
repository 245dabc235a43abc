"""The manual (docs/, built with MkDocs) documents every recipe key and registry entry (generated
pages in sync), the site builds with --strict, and the README holds the CI test command and
links that resolve."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmpeft.docs import REGISTRIES_PAGE, _registries, generated, replace_block, stale_pages

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


@pytest.mark.parametrize("page", sorted(generated()))
def test_generated_reference_in_sync(page):
    start, end, block = generated()[page]
    text = (ROOT / page).read_text()
    assert text.split(start, 1)[1].split(end, 1)[0].strip() == block.strip(), "run: python -m mmpeft.docs --write"
    assert page not in stale_pages(ROOT)


def test_replace_block_keeps_the_text_around_it():
    text = "# Title\n\nby hand\n<!-- a -->\nold\n<!-- b -->\nafter\n"
    new = replace_block(text, "<!-- a -->", "<!-- b -->", "new")
    assert new == "# Title\n\nby hand\n<!-- a -->\nnew\n<!-- b -->\nafter\n"
    with pytest.raises(ValueError):
        replace_block("no markers", "<!-- a -->", "<!-- b -->", "new")


def test_every_registered_name_documented():
    """Every name of every registry: a row of the generated registries page and of the
    hand-written Concepts page, and named in the README."""
    registries = (DOCS / REGISTRIES_PAGE.removeprefix("docs/")).read_text()
    concepts = (DOCS / "concepts.md").read_text()
    tasks_section = concepts.split("\n## Tasks", 1)[1]
    readme = README.read_text()
    for title, _, registry, _, _ in _registries():
        assert registry.names(), title
        for name in registry.names():
            assert f"| `{name}` |" in registries, (title, name)
            if title == "Tasks":  # the task table's first column lists vqa and classification together
                row = re.search(rf"^\| (`\w+`, )*`{name}`", tasks_section, re.M)
            else:
                row = f"| `{name}`" in concepts
            assert row, f"{title}: {name} has no row in docs/concepts.md"
            assert f"`{name}`" in readme, f"{title}: {name} is not named in README.md"


def test_site_builds_strict(tmp_path):
    """mkdocs.yml makes every link, anchor and page-outside-nav problem a warning; --strict fails on one."""
    assert importlib.util.find_spec("mkdocs") and importlib.util.find_spec("material"), \
        "mkdocs-material is missing: pip install -e '.[dev]'"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "registries" / "index.html").exists()
    assert (tmp_path / "site" / "serve.png").exists()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve():
    """The README's relative links (into docs/ and benchmarks/) name files that exist, and
    their anchors headings of those files."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.exists(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, link


def test_readme_has_ci_test_command():
    text = README.read_text()
    after = text.split("<!-- ci:test -->", 1)[1]
    command = after.split("```bash", 1)[1].split("```", 1)[0]
    assert "pip install torch==2.13.0" in command and "pytest" in command


def test_readme_stays_an_entrance():
    """The README is an entrance of about 300 lines at most; the manual is the docs site."""
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"
