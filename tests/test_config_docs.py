"""The docs stay true to the code and to themselves.

- ``docs/config.md`` is what ``raydpo config-docs`` generates from the config dataclasses: the test
  fails when a field, default, type or docstring changed without ``make docs``.
- Every field of every section (nested ones included) is on the page with its own docstring, read
  here independently of :mod:`raydpo.config.reference` (straight from the class source with ``ast``).
- README.md stays a front page (at most 300 lines) that links every page of docs/, and every relative
  link in README.md and docs/*.md points to a file that exists (and, with ``#anchor``, to a heading
  that exists there).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from pathlib import Path

import pytest

from raydpo.cli import main
from raydpo.config import Config
from raydpo.config.reference import render

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "config.md"
TOPICS = ["data", "losses", "reference-and-caches", "training", "online", "sweeps", "clusters", "observability",
          "failures", "performance", "config"]


def _docstrings(cls: type) -> dict[str, str]:
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    body = node.body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def _fields(cls: type = Config, prefix: str = ""):
    """(dotted key, docstring, is a section) of every field, sections and their fields alike."""
    hints, docs = typing.get_type_hints(cls), _docstrings(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} ({key}) has no docstring"
        nested = dataclasses.is_dataclass(hints[f.name])
        yield key, docs[f.name], nested
        if nested:
            yield from _fields(hints[f.name], key + ".")


def _as_markdown(doc: str) -> str:
    text = " ".join(inspect.cleandoc(doc).split())
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    return re.sub(r"``(.+?)``", r"`\1`", text)


def test_config_page_is_not_stale():
    assert PAGE.exists(), "docs/config.md is missing: run `make docs` (raydpo config-docs) and commit it"
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/config.md is stale: it differs from the config dataclasses' docstrings; run `make docs` "
        "(raydpo config-docs) and commit the page")


def test_every_field_is_on_the_page_with_its_docstring():
    page = render()
    lines = page.splitlines()
    keys = list(_fields())
    assert len(keys) > 100 and {"model.lora", "online.generator", "online.judge"} <= {k for k, _, s in keys if s}
    for key, doc, is_section in keys:
        text = _as_markdown(doc)
        if is_section:
            heading = lines.index(f"## `{key}`")
            assert lines[heading + 2] == text, (key, lines[heading + 2])
        else:
            (row,) = [line for line in lines if line.startswith(f"| `{key}` |")]
            assert text.replace("|", "\\|") in row, (key, row)
    # and nothing on the page that is not a field any more
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_.0-9]+)` \|", page, re.M)}
    assert rows == {k for k, _, s in keys if not s}


def test_config_docs_command(tmp_path, capsys):
    out = tmp_path / "docs" / "config.md"
    assert main(["config-docs", "--check", "--out", str(out)]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["config-docs", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render()
    assert main(["config-docs", "--check", "--out", str(out)]) == 0
    out.write_text(render().replace("Adapter rank", "Adapter size"), encoding="utf-8")
    assert main(["config-docs", "--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and "make docs" in err


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    n = len(readme.splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail into docs/ (at most 300)"
    for topic in TOPICS:
        assert (REPO / "docs" / f"{topic}.md").exists(), topic
        assert f"](docs/{topic}.md" in readme, f"README.md does not link docs/{topic}.md"
    # .ci/run runs `make test`, "the test command README.md gives"
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    # the config table is generated, not written by hand
    for md in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        if md != PAGE:
            assert "| `model.name_or_path` |" not in md.read_text(encoding="utf-8"), f"{md.name}: a hand-written config table"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)                                        # nor do code spans
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("name", ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))])
def test_relative_links_resolve(name):
    md = REPO / name
    broken = []
    for link in _links(md):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:, ...
            continue
        path, _, anchor = link.partition("#")
        target = (md.parent / path).resolve() if path else md
        if not target.exists():
            broken.append(f"{link} (no file {target.relative_to(REPO) if target.is_relative_to(REPO) else target})")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.name})")
    assert not broken, f"{name}: broken links: {broken}"
