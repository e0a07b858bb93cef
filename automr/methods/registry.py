"""The registry of methods: a name -> the factory that builds its Recommender.

Factories are imported only when a method is built, so listing the methods (for `--help`) loads
no torch. `build_methods` is the one place that builds the methods of an evaluation and checks
the paths their options name; `automr evaluate` and `automr run` both call it before any method
is fitted.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from automr.errors import UserError
from automr.methods.base import Recommender
from automr.utils.fingerprint import is_within
from automr.utils.method_names import is_variant_of, method_kind

# method name -> "module:factory"; factory(options: dict, seed: int) -> Recommender.
METHODS: dict[str, str] = {
    "popularity": "automr.methods.popularity:make",
    "sasrec": "automr.methods.sasrec:make",
    "bigrec": "automr.methods.bigrec:make_bigrec",
    "automr": "automr.methods.automr:make_automr",
    "random": "automr.methods.automr:make_random",
    "recent": "automr.methods.automr:make_recent",
    "rella": "automr.methods.rella:make",
    "trsr": "automr.methods.trsr:make",
    # A diagnostic, not a method: the best element by the evaluated samples' own labels (needs `annotations`).
    "oracle": "automr.methods.automr:make_oracle",
}


def is_known(name: str) -> bool:
    """A registry name, or a variant KIND@LABEL of one (automr/utils/method_names.py)."""
    return is_variant_of(name, METHODS)


def make_method(name: str, options: dict[str, Any] | None = None, seed: int = 0) -> Recommender:
    """Build a method by name (or a variant KIND@LABEL), with a clear error for an unknown one."""
    if not is_known(name):
        raise UserError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}, or a variant KIND@LABEL of one "
                        "(LABEL: letters, digits, _ . -)")
    module, _, attr = METHODS[method_kind(name)].partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"method {name!r} is not available in this build ({exc})") from None
    return factory(options or {}, seed)


def _queries_problem(folder: str | Path) -> str | None:
    if Path(folder).is_dir():
        return None
    return f"no query folder at {folder} (expected build-memory's queries/ with {{split}}.npy); fix the path or leave `queries` out"


def _path_checks() -> dict[str, Callable[[str], str | None]]:
    """Option name -> why its path is not the right kind of output (None when it is).

    Each check lives next to the loader that reads that output, so both say the same thing;
    none of them imports torch.
    """
    from automr.llm.finetune import adapter_problem
    from automr.llm.loading import model_problem
    from automr.memory.annotate import annotations_problem
    from automr.memory.retriever_config import retriever_problem
    from automr.memory.store import store_problem

    return {
        "adapter": adapter_problem,
        "memory": store_problem,
        "retriever": retriever_problem,
        "queries": _queries_problem,
        "model": model_problem,
        "summary_model": model_problem,
        "annotations": annotations_problem,
    }


def path_option_problems(options: Mapping[str, Any], produced: Iterable[Path] = ()) -> list[str]:
    """Problems with the paths a method's options name (adapter, memory, retriever, queries, model).

    Paths inside `produced` (outputs that an earlier stage of the same `automr run` will write) are
    not checked: they need not exist yet.
    """
    produced = list(produced)
    problems = []
    for key, check in _path_checks().items():
        value = options.get(key)
        if not isinstance(value, str | Path) or is_within(Path(value), produced):
            continue
        problem = check(str(value))
        if problem:
            problems.append(f"{key}: {problem}")
    return problems


def build_methods(
    names: Iterable[str],
    options: Mapping[str, dict[str, Any]],
    seed: int = 0,
    *,
    check_paths: bool = True,
    produced: Iterable[Path] = (),
) -> tuple[dict[str, Recommender], list[str]]:
    """Build every method and check the paths its options name, before any method is fitted.

    Returns (the methods that built, every problem as "method NAME: ..."), so that one bad option
    of the last method is reported with all the others instead of failing after the first methods
    ran. `check_paths=False` checks the options only; `produced` as in `path_option_problems`.
    """
    produced = list(produced)
    built: dict[str, Recommender] = {}
    problems: list[str] = []
    for name in names:
        opts = dict(options.get(name) or {})
        try:
            built[name] = make_method(name, opts, seed)
        except UserError as exc:
            problems.append(f"method {name}: {exc}")
        if check_paths:
            problems += [f"method {name}: {p}" for p in path_option_problems(opts, produced)]
    return built, problems
