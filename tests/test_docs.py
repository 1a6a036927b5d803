"""The documentation: a short README, every relative link in it and in docs/ and the study reports pointing at a
file (and heading) that exists, and docs/jobs.md naming every key of every job's config."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results/reports").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_LIMIT = 10 * 1024  # bytes: how to run a job fits on one page; the rest is one link away


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # no headings inside code blocks
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` whose file, or heading in that file, does not exist."""
    broken = []
    for target in LINK.findall(re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists() or (anchor and where.suffix == ".md" and anchor not in anchors(where)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_something(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links {broken_links(page)}"


def test_the_link_check_sees_missing_files_and_headings(tmp_path):
    (tmp_path / "b.md").write_text("# A heading (`with code`)\n")
    (tmp_path / "a.md").write_text("[ok](b.md) [ok](b.md#a-heading-with-code) [web](https://x.y/z) [self](#top)\n"
                                   "# Top\n[gone](c.md) [no heading](b.md#other)\n```\n[in code](d.md)\n```\n")
    assert broken_links(tmp_path / "a.md") == ["c.md", "b.md#other"]


def test_the_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move detail to docs/ (limit {README_LIMIT})"


def test_jobs_doc_names_every_config_key():
    """docs/jobs.md's table of keys lists each job's own top-level keys (`cqil <job> --help` has the rest)."""
    from cqil.cli import JOBS
    from cqil.paths import conf_dir

    rows = {m[0]: m[1] for m in re.findall(r"^\| `cqil (\w+)` \| `conf/\w+\.yaml` \|(.*)$",
                                            (ROOT / "docs/jobs.md").read_text(), flags=re.M)}
    missing = {}
    for job in JOBS:
        keys = [k for k in OmegaConf.load(conf_dir() / f"{job}.yaml") if k != "defaults"]
        if job == "plot":  # one input CSV and one output PNG key per figure: the row says so
            keys = [k for k in keys if not k.endswith(("_csv", "_png"))]
        missing[job] = [k for k in keys if f"`{k}`" not in rows.get(job, "")]
    assert not {j: m for j, m in missing.items() if m}, f"keys missing from docs/jobs.md: {missing}"
