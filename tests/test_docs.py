"""Every relative link in README.md and docs/*.md points at a file that exists, and an anchor at one of
its headings (GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The page without its fenced code blocks and inline code (brackets there are not links)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"(?ms)^```.*?^```", "", path.read_text()))


def anchors(path: Path) -> set[str]:
    ids = set()
    for heading in re.findall(r"(?m)^#{1,6} (.+)$", prose(path)):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        ids.add(slug if slug not in ids else next(f"{slug}-{n}" for n in range(1, 99) if f"{slug}-{n}" not in ids))
    return ids


def test_relative_links_resolve():
    assert len(PAGES) > 1, "docs/ has no pages"
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto: ...
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists() or (anchor and (dest.suffix != ".md" or anchor not in anchors(dest))):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)
