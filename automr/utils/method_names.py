"""Method names: a registry name ("bigrec") or a variant of one ("bigrec@bf16").

A variant is the same method under another name with its own method_options entry, so that one
evaluation can rank the same samples with two settings of one method and test them paired (e.g.
`compare: [bigrec@bf16:bigrec]`). Here, not in automr/methods/registry.py, because the report and the
serving API read method names too and must not import the methods package.
"""

from __future__ import annotations

import re
from collections.abc import Container

VARIANT_LABEL = re.compile(r"[A-Za-z0-9_.-]+")
CLASSIC_METHODS = frozenset({"popularity", "sasrec"})  # the methods that are no LLM (no model, no adapter)


def method_kind(name: str) -> str:
    """The registry name behind a method name: "bigrec@bf16" -> "bigrec", "bigrec" -> "bigrec"."""
    return name.split("@", 1)[0]


def is_variant_of(name: str, kinds: Container[str]) -> bool:
    """Whether `name` is one of `kinds` or a well-formed variant KIND@LABEL of one (LABEL: letters, digits, _ . -)."""
    kind, sep, label = name.partition("@")
    return kind in kinds and (not sep or VARIANT_LABEL.fullmatch(label) is not None)
