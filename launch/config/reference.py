"""The config reference, generated from the field docstrings (README table and `--help` epilog)."""

from __future__ import annotations

import ast
import dataclasses
import inspect

from launch.config.fields import Config


def field_docs(cls) -> dict[str, str]:
    """Map field name -> docstring, read from the class source (the string after each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _rows():
    """(section, field name, default, doc) for every setting, in declaration order."""
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default):  # a nested section (model.lora): its fields, dotted
                inner = field_docs(type(default))
                for g in dataclasses.fields(default):
                    yield section.name, f"{f.name}.{g.name}", getattr(default, g.name), inner.get(g.name, "")
            else:
                yield section.name, f.name, default, docs.get(f.name, "")


def reference_markdown() -> str:
    """The config reference as a Markdown table (docs/config.md: `python -m launch.config`)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{s}.{name}` | `{default!r}` | {doc} |" for s, name, default, doc in _rows()]
    return "\n".join(lines)


def reference() -> str:
    """The config reference as plain text (the entry scripts' --help)."""
    lines, current = [], None
    for s, name, default, doc in _rows():
        if s != current:
            lines.append(f"{s}:")
            current = s
        lines.append(f"  {s}.{name} = {default!r}  # {doc}")
    return "\n".join(lines)
