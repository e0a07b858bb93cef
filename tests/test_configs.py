"""Every shipped pipeline config validates (stages, their settings and each method's options)."""

from __future__ import annotations

from pathlib import Path

import pytest

from automr.pipeline import plan_pipeline

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "synthetic-tiny.yaml", "movielens-1m.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates(path: Path) -> None:
    planned = plan_pipeline(path)
    assert planned, f"{path.name} plans no stage"
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{path.name} should start with a comment naming its command"
    assert f"automr run configs/{path.name}" in path.read_text()
