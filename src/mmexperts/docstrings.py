"""``Args:`` blocks for config dataclasses, written from each field's ``help`` metadata, so the command line's
``--help`` and the API docs (the Hugging Face doc-builder reads ``Args:``) come from one text."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap

INDENT = " " * 4
WIDTH = 116


def field_type_name(spec: dataclasses.Field) -> str:
    """A dataclass field's type as written (``"str | None"``), with or without postponed annotations."""
    return spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))


def _default(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        return f", defaults to `{spec.default!r}`"
    if spec.default_factory is not dataclasses.MISSING:
        return f", defaults to `{spec.default_factory()!r}`"
    return ""


def document_fields(cls: type) -> type:
    """Class decorator (above ``@dataclass``): append an ``Args:`` block listing the fields this package declares
    (those inherited from PEFT's ``PeftConfig`` are documented by PEFT), each with its type, default and help."""
    own = {name for klass in cls.__mro__ if klass.__module__.startswith("mmexperts")
           for name in vars(klass).get("__annotations__", {})}
    lines = ["", "Args:"]
    for spec in dataclasses.fields(cls):
        if spec.name not in own or not spec.init:
            continue
        lines.append(f"{INDENT}{spec.name} (`{field_type_name(spec)}`{_default(spec)}):")
        help_text = " ".join(spec.metadata.get("help", "").split()) or "See the class description."
        lines += textwrap.wrap(help_text, WIDTH - 2 * len(INDENT), initial_indent=2 * INDENT,
                               subsequent_indent=2 * INDENT, break_on_hyphens=False)
    cls.__doc__ = inspect.cleandoc(cls.__doc__ or "") + "\n" + "\n".join(lines)
    return cls
