"""docs/*.md cannot rot either: each page's ```bash commands on the demo model (or
estimate-only `mesp_mlx.memory` questions) run with few iterations, and its ```python
blocks run as written (the rules of tests/test_readme.py). The pages and the README
also keep their form: the README stays a page of at most 300 lines that links every
docs page, links resolve, every page with memory figures states its unit, and no page
refers to the project's internal process (issue numbers, stops, reference sections)."""

import re


import pytest
from page_commands import (DEMO_MODEL, README, ROOT, page_commands, python_blocks,
                         run_command, run_python_block)

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
EXPECTED = ("mlx-lm", "families", "paper-setting", "long-context", "memory-budget",
            "data-parallel", "mezo", "python-api", "how-it-works", "results")
PROCESS = re.compile(r"[i]ssue [0-9]+|REFERENC[E] §|ARCHITECTURE[S] §|stop [0-9]+|"
                     r"stop [0-9]+'s|\b[0-9]+(st|nd|rd|th) stop\b", re.I)
UNIT = "MB = 10⁶ bytes"
needs_demo = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(),
                                reason=f"demo model not built ({DEMO_MODEL})")


def test_every_expected_page_exists_and_the_readme_links_it():
    names = {p.stem for p in PAGES}
    assert set(EXPECTED) <= names, f"missing docs pages: {set(EXPECTED) - names}"
    readme = README.read_text()
    for name in names:
        assert f"docs/{name}.md" in readme, f"README.md does not link docs/{name}.md"


def test_readme_is_a_page_not_a_manual():
    n = len(README.read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines; move depth to docs/ (limit 300)"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue                                   # http(s), mailto
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_no_internal_process_references(page):
    hits = [m.group(0) for m in PROCESS.finditer(page.read_text())]
    assert not hits, f"{page.name} refers to internal process: {hits}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_pages_with_memory_figures_state_the_unit(page):
    text = page.read_text()
    if re.search(r"\d MB\b", text):
        assert UNIT in text, f"{page.name} shows MB figures without stating '{UNIT}'"
    binary = re.findall(r"\d\s*MiB\b|MB = 2²⁰", text)
    assert not binary, f"{page.name}: one unit, {UNIT} (found {binary})"


@needs_demo
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_commands_run(page, tmp_path):
    """Bash commands in page order (later ones may use earlier adapters), then the
    python blocks, each in a fresh temporary directory."""
    for c in page_commands(page, tmp_path):
        if c.run:
            run_command(c, tmp_path)
    for code in python_blocks(page.read_text()):
        run_python_block(code, tmp_path)
