"""The one console of automr: results and throughput lines on stdout, warnings on stderr.

Every message goes through the two rich consoles made here (not through `print` or a fresh
`Console()` per call site), so a progress bar and the lines printed under it share one live
display. On a terminal the consoles take its width; elsewhere (a log file, a pipe, CI) they
soft-wrap at an unlimited width, so a line is never broken mid-sentence at 80 columns.
`quiet_libraries()` keeps transformers' loading bars and deprecation warnings out of our output.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import IO

from rich.console import Console
from rich.rule import Rule
from rich.text import Text

# rich has no "unlimited" width; with soft wrapping text is never broken at any width, and this
# one only bounds what rich lays out to a width (tables are not expanded, so they stay narrow).
LOG_WIDTH = 100_000
RULE_WIDTH = 80  # a rule off a terminal: a full LOG_WIDTH line of dashes would be absurd
NOISY_LIBRARIES = ("transformers", "peft", "accelerate")


def make_console(stream: IO[str] | None = None, *, stderr: bool = False) -> Console:
    """A console on `stream` (default: the process's stdout or stderr, looked up at each write).

    A terminal gets rich's usual wrapping at its width; anything else soft-wraps at LOG_WIDTH.
    No highlighting and no :emoji: codes, so text comes out as written.
    """
    target = stream if stream is not None else (sys.stderr if stderr else sys.stdout)
    terminal = bool(getattr(target, "isatty", lambda: False)())
    return Console(
        file=stream, stderr=stderr, highlight=False, emoji=False, soft_wrap=not terminal,
        width=None if terminal else LOG_WIDTH,
    )


@functools.cache
def get_console(stderr: bool = False) -> Console:
    """The process-wide console on stdout (results, throughput) or stderr (warnings, errors), made once."""
    return make_console(stderr=stderr)


def info(message: str) -> None:
    """A result or throughput line on stdout, printed as is (no rich markup, so '[...]' stays)."""
    get_console().print(message, markup=False)


def warn(message: str) -> None:
    """A warning on stderr: 'warning: ' and the message as is."""
    get_console(stderr=True).print(Text.assemble(("warning: ", "bold yellow"), message))


def note(message: str) -> None:
    """A status line on stderr (what a guard did, a lock taken over), printed as is."""
    get_console(stderr=True).print(Text(message))


def rule(title: str) -> None:
    """A section header on stdout: rich's rule across a terminal, a short one in a log file."""
    console = get_console()
    if console.is_terminal:
        console.rule(title)
    else:
        console.print(Rule(title), width=RULE_WIDTH)


def quiet_libraries() -> None:
    """Silence transformers / huggingface_hub chatter: INFO logs, weight-loading bars, Future/UserWarnings.

    Called where models are loaded (automr.llm.loading, the sentence encoder), not at CLI start,
    so `automr --help` never imports transformers. Safe to call repeatedly (warnings.filterwarnings
    replaces an identical filter instead of adding another).
    """
    for lib in NOISY_LIBRARIES:
        for category in (FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=rf"{lib}(\.|$)")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


__all__ = ["LOG_WIDTH", "get_console", "info", "make_console", "quiet_libraries", "rule", "warn"]
