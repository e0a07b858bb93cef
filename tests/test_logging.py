"""One console (automr.utils.logging) and one progress bar (automr.utils.progress) for all output."""

from __future__ import annotations

import ast
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from automr.utils.logging import (
    LOG_WIDTH,
    RULE_WIDTH,
    get_console,
    info,
    make_console,
    quiet_libraries,
    rule,
    warn,
)
from automr.utils.progress import rate_progress, track

PACKAGE = Path(__file__).resolve().parents[1] / "automr"
LONG = " ".join(f"word{i}" for i in range(80))  # about 550 characters, spaces to wrap at


def test_a_long_message_to_a_non_terminal_is_one_line() -> None:
    stream = io.StringIO()
    console = make_console(stream)
    assert not console.is_terminal and console.width == LOG_WIDTH
    console.print(LONG)
    assert stream.getvalue().rstrip("\n").rstrip() == LONG


def test_a_terminal_keeps_its_width() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    console = make_console(Tty())
    assert console.is_terminal and console.width < LOG_WIDTH and not console.soft_wrap


def test_info_goes_to_stdout_as_is_and_warn_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    info(f"shard [r001-of-004] :smile: {LONG}")
    warn("the store changed [since yesterday]")
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"shard [r001-of-004] :smile: {LONG}"]  # one line, as written (no markup, no emoji)
    assert err.splitlines() == ["warning: the store changed [since yesterday]"]


def test_a_section_rule_in_a_log_stays_short(capsys: pytest.CaptureFixture[str]) -> None:
    rule("[bold]prepare[/bold]")
    (line,) = capsys.readouterr().out.splitlines()
    assert " prepare " in line and len(line) == RULE_WIDTH


def test_one_console_per_stream() -> None:
    assert get_console() is get_console() and get_console(stderr=True) is get_console(stderr=True)
    assert get_console() is not get_console(stderr=True) and get_console(stderr=True).stderr
    assert rate_progress("rows").console is get_console()


def _own_output(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """print() calls, Console(...) / Progress(...) constructions and rich.progress imports in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("print", "Console", "Progress"):
                yield node.lineno, f.id
            elif isinstance(f, ast.Attribute) and f.attr in ("Console", "Progress"):
                yield node.lineno, f.attr
        elif isinstance(node, ast.ImportFrom) and node.module == "rich.progress":
            yield node.lineno, "from rich.progress import"
        elif isinstance(node, ast.Import) and any(a.name == "rich.progress" for a in node.names):
            yield node.lineno, "import rich.progress"


def test_no_module_prints_or_builds_its_own_console_or_bar() -> None:
    own = {PACKAGE / "utils" / "logging.py", PACKAGE / "utils" / "progress.py"}
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py")) if path not in own
        for line, what in _own_output(ast.parse(path.read_text()))
    ]
    assert found == []


def test_rate_progress_shows_task_fields_and_a_per_task_unit() -> None:
    stream = io.StringIO()
    with rate_progress("files", console=make_console(stream), fields=("tps",)) as bar:
        task = bar.add_task("reading", total=4, tps="12 tok/s", unit="rows")
        bar.advance(task, 4)
    line = stream.getvalue().strip()
    assert line.startswith("reading") and "4/4" in line and "12 tok/s" in line and "files/s" not in line
    with rate_progress("files", console=make_console(stream := io.StringIO()), disable=True) as bar:
        bar.advance(bar.add_task("hidden", total=1))
    assert stream.getvalue() == ""
    assert list(track(range(3), "items", "counting", disable=True)) == [0, 1, 2]


@pytest.fixture
def _restore_libraries() -> Iterator[None]:
    """quiet_libraries changes process-wide settings: put them back after the test."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    level, bars, hub_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    with warnings.catch_warnings():
        yield
    hf_logging.set_verbosity(level)
    if bars:
        hf_logging.enable_progress_bar()
    if not hub_bars:
        enable_progress_bars()


def test_quiet_libraries_silences_transformers(_restore_libraries: None) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    enable_progress_bars()
    quiet_libraries()
    logger = hf_logging.get_logger("transformers.modeling_utils")
    assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
    assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # what a plain run shows: each warning once per place
        quiet_libraries()  # filters go in front of that default
        for module in ("transformers.modeling_utils", "peft.tuners", "accelerate", "automr.llm.loading"):
            warnings.warn_explicit(f"old API in {module}", FutureWarning, "x.py", 1, module=module)
        warnings.warn_explicit("weights not tied", UserWarning, "y.py", 1, module="transformers.modeling_utils")
    assert [str(w.message) for w in seen] == ["old API in automr.llm.loading"]  # ours still shows
