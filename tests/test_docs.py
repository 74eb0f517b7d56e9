"""The repository's own documents stay true to the tree.

* Every citation of a section of docs/DESIGN.md (the path, a comma, the section title in
  double quotes) in any file of the repository names a heading of docs/DESIGN.md (a
  citation may wrap onto the next comment line).
* No file cites the design document by a bare name (it lives in docs/), and nothing
  points outside the repository (the paper and the design notes are restated in
  docs/DESIGN.md, not linked; no absolute path of a development machine).
* Every path that docs/DESIGN.md and tests/README.md name (in backticks) exists, and their
  in-page links (``#anchor``) lead to a heading.

Files: those git tracks plus untracked ones it does not ignore; without git (an unpacked
archive), every file under the root outside hidden and build folders.
"""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs/DESIGN.md")
TESTS_README = os.path.join(ROOT, "tests", "README.md")

SKIP_DIRS = {"build", "dist", "__pycache__", "node_modules", "results", "runs"}
TEXT_SUFFIXES = (".py", ".md", ".h", ".hpp", ".c", ".cc", ".cpp", ".cu", ".cuh", ".toml",
                 ".cfg", ".ini", ".txt", ".in", ".yml", ".yaml", ".json", ".sh", ".rst")
TEXT_NAMES = {"Makefile", "LICENSE", "run"}

# A citation: the design document's path, a comma, then a quoted section title, which may
# continue on the next line after a comment marker (#, //, *).
CITATION = re.compile(r"docs/DESIGN\.md,\s*(?:(?:#|//|\*)\s*)?\"([^\"]*)\"")
# The document named without its folder (docs/ in front is the one accepted form).
BARE = re.compile(r"(?<![\w/.-])DESIGN\.md|(?<!docs/)(?<=/)DESIGN\.md")
# Pointers outside the repository: the sibling shared folder (its paper and design
# notes), the paper's text file, any absolute path of the machines it is developed on.
# (Written so that this file does not match itself.)
OUTSIDE = re.compile(r"\.\./shared\b|\bshared/(?:paper\b|DESIGN\.md)|levine-feizi-2021-dssn\.txt"
                     r"|(?<![\w.~-])/work/(?=[\w.])")
WRAP = re.compile(r"\s*\n\s*(?:#|//|\*)?\s*")


def repo_files():
    """Relative paths of the repository's text files."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [p for p in out.splitlines() if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                           and not d.endswith(".egg-info")]
            paths += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
    return sorted(p for p in paths
                  if (p.endswith(TEXT_SUFFIXES) or os.path.basename(p) in TEXT_NAMES)
                  and os.path.isfile(os.path.join(ROOT, p)))


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
        return f.read()


def headings(path):
    """The titles of the markdown headings of ``path`` (outside code blocks)."""
    titles, fenced = [], False
    for line in read(path).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            titles.append(line.lstrip("#").strip())
    return titles


def slug(title):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


FILES = repo_files()


def test_the_design_document_exists_and_files_were_found():
    assert os.path.isfile(DESIGN), "docs/DESIGN.md is missing"
    assert "docs/DESIGN.md" in FILES and "tests/test_docs.py" in FILES


def test_citations_name_existing_sections():
    titles = headings(DESIGN)
    twice = sorted({t for t in titles if titles.count(t) > 1})
    assert not twice, f"docs/DESIGN.md has several headings titled {twice}: citations need one"
    sections = set(titles)
    bad = []
    for rel in FILES:
        text = read(rel)
        for match in CITATION.finditer(text):
            title = WRAP.sub(" ", match.group(1)).strip()
            if title not in sections:
                bad.append(f"{rel}:{line_of(text, match.start())}: \"{title}\"")
    assert not bad, ("citations of docs/DESIGN.md sections that are not headings there:\n  "
                     + "\n  ".join(bad) + "\nheadings: " + "; ".join(sorted(sections)))


def test_no_bare_design_citation():
    bad = [f"{rel}:{line_of(read(rel), m.start())}"
           for rel in FILES for m in BARE.finditer(read(rel))]
    assert not bad, ("the design document is cited without its folder (write docs/DESIGN.md): "
                     + ", ".join(bad))


def test_nothing_points_outside_the_repository():
    bad = [f"{rel}:{line_of(read(rel), m.start())}: {m.group(0)}"
           for rel in FILES for m in OUTSIDE.finditer(read(rel))]
    assert not bad, ("references to files outside the repository (restate what is needed in "
                     "docs/DESIGN.md instead): " + ", ".join(bad))


# A backticked token naming a repository path: a top-level folder or file of the tree.
TOP = ("dssn_kernels/", "csrc/", "python/", "tests/", "benchmarks/", "docs/")
TOP_FILES = ("setup.py", "pyproject.toml", "Makefile", "README.md", "requirements-dev.txt")


def named_paths(path):
    """(line, path) for every backticked repository path in ``path``; ``a/b.py::name``
    and ``a/b.py (...)`` forms are reduced to the file, and a bare ``test_*.py`` is a file
    of tests/."""
    out = []
    text = read(path)
    for match in re.finditer(r"`([^`\n]+)`", text):
        token = match.group(1).split("::")[0].split(" ")[0].rstrip(",.;:")
        if re.fullmatch(r"test_\w+\.py", token):
            token = "tests/" + token
        if token.startswith(TOP) or token in TOP_FILES:
            out.append((line_of(text, match.start()), token))
    return out


@pytest.mark.parametrize("doc", [DESIGN, TESTS_README], ids=["DESIGN", "tests-README"])
def test_named_paths_exist(doc):
    assert os.path.isfile(doc), f"{os.path.relpath(doc, ROOT)} is missing"
    paths = named_paths(doc)
    assert paths, f"{os.path.relpath(doc, ROOT)} names no repository path"
    missing = [f"line {n}: {p}" for n, p in paths
               if not any(os.path.exists(c) for c in
                          ([os.path.join(ROOT, x) for x in _globless(p)]))]
    assert not missing, (f"{os.path.relpath(doc, ROOT)} names paths that do not exist: "
                         + ", ".join(missing))


def _globless(token):
    """A path, or for ``dir/*`` and ``dir/*.ext`` the folder."""
    return [token.split("*")[0].rstrip("/") or "."] if "*" in token else [token]


def test_tests_readme_names_every_test_file():
    """Each test file of the repository has its line in tests/README.md's module table."""
    text = read(TESTS_README)
    here = sorted(os.path.basename(p) for p in FILES
                  if re.fullmatch(r"tests/test_\w+\.py", p))
    absent = [f for f in here if f"`{f}`" not in text]
    assert not absent, ("tests/README.md does not say what these test files cover (add them "
                        f"to its module table): {', '.join(absent)}")


@pytest.mark.parametrize("doc", [DESIGN, TESTS_README], ids=["DESIGN", "tests-README"])
def test_in_page_links_lead_to_headings(doc):
    anchors = {slug(t) for t in headings(doc)}
    links = re.findall(r"\]\(#([^)]+)\)", read(doc))
    broken = [a for a in links if a not in anchors]
    assert not broken, f"{os.path.relpath(doc, ROOT)}: links to missing headings: {broken}"
