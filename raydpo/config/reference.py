"""The config reference page (``docs/config.md``), generated from the dataclasses of :mod:`raydpo.config`.

:func:`render` walks :class:`raydpo.config.Config` and its sections (nested ones such as ``model.lora``,
``online.generator`` and ``online.judge`` included) and writes one Markdown table per section: the
dotted key, its type, its default and the field's docstring (the string literal right after the
field in the class body, read with :mod:`ast`). ``raydpo config-docs`` writes the page, and
``raydpo config-docs --check`` (and ``tests/test_config_docs.py``) fails when the checked-in page is stale.

Pure and torch-free: it imports nothing but the config package.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from typing import Any, Iterator, Literal, Union

from raydpo.config.sections import Config

PAGE = "docs/config.md"

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # Sphinx roles (:mod:`x`, :func:`~x`) -> `x`
_RST_CODE = re.compile(r"``(.+?)``")        # reStructuredText literals -> Markdown code spans


def field_docstrings(cls: type) -> dict[str, str]:
    """{field name: its docstring as written} for a dataclass: the string literal right after each
    annotated field in the class body (raises when a field has none)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    docs: dict[str, str] = {}
    for stmt, after in zip(node.body, node.body[1:] + [None]):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
    if missing:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: fields without a docstring: {', '.join(missing)}")
    return docs


def markdown_text(doc: str) -> str:
    """A field docstring as one Markdown table cell: one line, code spans in Markdown, pipes escaped."""
    text = " ".join(doc.split())
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    text = _RST_CODE.sub(lambda m: f"`{m.group(1)}`", text)
    return text.replace("|", "\\|")


def _scalar(value: Any) -> str:
    """A default as it would be written in the YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), repr(value))
    if isinstance(value, str):
        plain = value and value == value.strip() and not re.search(r"[\n:#{}\[\],&*!|>'\"%@`]", value)
        return value if plain else '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_scalar(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"`{_scalar(f.default_factory())}`"  # type: ignore[misc]
    return "(required)"


def type_text(tp: Any) -> str:
    """A resolved annotation in words: ``int``, ``float32`` / ``bfloat16``, ``str`` or ``null``, ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "`null`"
    if origin is Literal:
        return " / ".join(f"`{_scalar(a)}`" for a in args)
    if origin is Union:
        if len(args) == 2 and typing.get_origin(args[1]) is list and typing.get_args(args[1]) == (args[0],):
            return f"{type_text(args[0])}, or a list of them"  # loss.type: one name or several
        parts = [type_text(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("`null`")
        return " or ".join(parts)
    if origin in (list, tuple):
        (inner,) = args[:1] or (Any,)
        text = type_text(inner)
        return f"list of ({text})" if typing.get_origin(inner) in (Literal, Union) else f"list of {text}"
    if origin is dict:
        key, value = args or (Any, Any)
        return f"mapping of {type_text(key)} to {type_text(value)}"
    if tp is Any:
        return "any"
    return f"`{getattr(tp, '__name__', str(tp))}`"


def sections(cls: type = Config, prefix: str = "", doc: str = "") -> Iterator[tuple[str, type, str]]:
    """(dotted section name, its dataclass, the parent field's docstring), parents before children."""
    if prefix:
        yield prefix, cls, doc
    hints = typing.get_type_hints(cls)
    docs = field_docstrings(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from sections(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name, docs[f.name])


def rows(cls: type, prefix: str) -> Iterator[tuple[str, str, str, str]]:
    """(dotted key, type, default, docstring as Markdown) of each plain field of one section."""
    hints = typing.get_type_hints(cls)
    docs = field_docstrings(cls)
    for f in dataclasses.fields(cls):
        if not dataclasses.is_dataclass(hints[f.name]):
            yield f"{prefix}.{f.name}", type_text(hints[f.name]), _default(f), markdown_text(docs[f.name])


def render() -> str:
    """The whole config reference page, as ``docs/config.md`` holds it."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the dataclasses in raydpo/config/ (sections.py, online.py) by `raydpo config-docs`",
        "     (`make docs`); edit the field docstrings there, not this page. tests/test_config_docs.py fails when",
        "     this page is stale. -->",
        "",
        "A run's config is one YAML file with the sections below (`model.name_or_path` is required; every",
        "other key has the default shown). Any key can be overridden on the command line with its",
        "dotted name (`raydpo train cfg.yaml loss.beta=0.05 model.lora.r=16`; values are parsed as YAML).",
        "An unknown key is an error that suggests the closest key and lists the valid ones; a bad value",
        "names the valid values. The resolved config is written to `<output.dir>/config.yaml`.",
        "",
        "Sections: " + ", ".join(f"`{name}`" for name, _, _ in sections()) + ".",
    ]
    for name, cls, doc in sections():
        out += ["", f"## `{name}`", "", markdown_text(doc).replace("\\|", "|"), "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{key}` | {tp} | {default} | {text} |" for key, tp, default, text in rows(cls, name)]
    return "\n".join(out) + "\n"
