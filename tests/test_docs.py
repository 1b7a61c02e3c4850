"""The documentation's shape: a short README that points into the MkDocs site, and the files the site renders
from outside docs/ (DESIGN.md, benchmarks/README.md, through pymdownx.snippets) free of relative links, which
would resolve differently on GitHub and in the site. `mkdocs build --strict` itself runs in scripts/test."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
RELATIVE_LINK = re.compile(r"\]\((?!https?://|#|mailto:)[^)]+\)")


def test_the_readme_stays_short_and_links_to_the_site():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in ["docs/install.md", "docs/design.md", "docs/performance.md", "benchmarks/README.md"]:
        assert f"]({page}" in readme, page
        assert (ROOT / page).is_file(), page


def test_files_rendered_through_snippets_have_no_relative_links():
    for name in ["DESIGN.md", "benchmarks/README.md"]:
        assert f'--8<-- "{name}"' in "".join(p.read_text() for p in (ROOT / "docs").glob("*.md")), name
        assert not RELATIVE_LINK.findall((ROOT / name).read_text()), name


def test_the_design_page_says_where_to_add_a_method_a_family_and_a_pass():
    design = (ROOT / "DESIGN.md").read_text()
    for heading in ["## Checklist: add a soft-prompt method", "## Checklist: add a model type to an existing family",
                    "## Checklist: add a new family", "## Checklist: add a graph pass"]:
        assert heading in design, heading
