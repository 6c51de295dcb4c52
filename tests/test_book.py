"""The book's configuration and pages: offline maths, the teaching kit, citations, test markers."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _toc_files(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["file"]] if "file" in node else []) + [f for v in node.values() for f in _toc_files(v)]
    if isinstance(node, list):
        return [f for item in node for f in _toc_files(item)]
    return []


def test_mathjax_is_served_from_the_book():
    sphinx = CONFIG["sphinx"]["config"]
    path = sphinx["mathjax_path"]
    assert not path.startswith(("http:", "https:", "//")), "MathJax must not come from a CDN"
    static = [ROOT / folder for folder in sphinx["html_static_path"]]
    script = next(folder / path for folder in static if (folder / path).is_file())
    assert script.stat().st_size > 500_000  # the combined TeX component, not a stub
    fonts = script.parent / "output" / "chtml" / "fonts" / "woff-v2"
    assert len(list(fonts.glob("*.woff"))) > 10
    total = sum(p.stat().st_size for p in script.parent.rglob("*") if p.is_file())
    assert total < 5_000_000


def test_teaching_pages_are_in_the_table_of_contents():
    files = _toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    for page in ("book/prerequisites", "book/syllabus", "book/bibliography"):
        assert page in files
        assert (ROOT / f"{page}.md").is_file()
    for chapter in CHAPTERS:
        assert f"notebooks/{chapter.stem}" in files


def test_citations_exist_and_entries_have_links():
    from pybtex.database import parse_file

    entries = parse_file(ROOT / "book" / "references.bib").entries
    for key, entry in entries.items():
        if key != "xu2019chd":  # a conference paper without an open copy; its note names the journal DOI
            assert "doi" in entry.fields or "url" in entry.fields, key
    texts = [p.read_text() for p in (ROOT / "book").glob("*.md")] + [c.read_text() for c in CHAPTERS]
    cited = {k.strip() for t in texts for group in re.findall(r"\{cite:[pt]\}`([^`]+)`", t)
             for k in group.split(",")}
    assert cited and cited <= set(entries), cited - set(entries)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_no_visible_test_markers(chapter):
    """nbval reads the nbval-check-output tag as it reads the comment, which the page would show."""
    for cell in json.loads(chapter.read_text())["cells"]:
        source = "".join(cell["source"])
        assert "NBVAL_" not in source, f"{chapter.name}: use the nbval-check-output tag"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapters_store_only_reference_outputs(chapter):
    """The book executes the chapters; a chapter stores only what nbval compares (scripts/strip_outputs.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("strip_outputs", ROOT / "scripts" / "strip_outputs.py")
    strip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(strip)
    text = chapter.read_text()
    assert strip.text(strip.stripped(json.loads(text))) == text, (
        f"{chapter.name}: run python scripts/strip_outputs.py {chapter.relative_to(ROOT)}")


def test_widgets_are_not_the_page_view():
    """A widget's output is removed from the page: its static figure follows it, and no widget
    manager is loaded from a CDN (a page would wait on it without a network)."""
    assert CONFIG["sphinx"]["config"]["nb_ipywidgets_js"] == {}
    for chapter in CHAPTERS:
        cells = json.loads(chapter.read_text())["cells"]
        for index, cell in enumerate(cells):
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and re.search(r"^\w*(browser|widget)\w*\(", source, re.M):
                assert "remove-output" in cell["metadata"].get("tags", []), chapter.name
                after = "".join("".join(c["source"]) for c in cells[index + 1:index + 3])
                assert "plt.show()" in after or "fig" in after, chapter.name


def test_bibliography_labels_read_like_the_citations():
    import importlib.util

    from pybtex.database import parse_file

    spec = importlib.util.spec_from_file_location("bibstyle", ROOT / "book" / "_ext" / "bibstyle.py")
    bibstyle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bibstyle)
    entries = parse_file(ROOT / "book" / "references.bib").entries
    labels = {key: bibstyle.author_year_label(entry) for key, entry in entries.items()}
    assert labels["lowe2004sift"] == "Lowe, 2004"
    assert labels["peyre2019cot"] == "Peyré and Cuturi, 2019"
    assert labels["yang2023kaf"] == "Yang et al., 2023"
    style = bibstyle.AuthorYearLabelStyle()
    unique = list(style.format_labels([entries["chen2020simclr"], entries["chen2020simclr"]]))
    assert unique == ["Chen et al., 2020a", "Chen et al., 2020b"]
