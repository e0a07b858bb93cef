"""Config loading, all-at-once validation errors, and the CLI's behaviour on user mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from automr.config import StageConfig, load_config, save_config
from automr.errors import UserError

AUTOMR = [sys.executable, "-m", "automr.cli"]


class ToyConfig(StageConfig):
    out: Path = Field(description="output folder")
    epochs: int = Field(3, ge=1, description="passes over the data")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    mode: Literal["a", "b"] = Field("a", description="which mode")
    methods: list[str] = Field(default_factory=lambda: ["x"], description="methods")


def test_yaml_then_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("out: here\nepochs: 5\nlr: 0.5\n")
    cfg = load_config(ToyConfig, cfg_file, lr=0.25)
    assert cfg.epochs == 5 and cfg.lr == 0.25 and cfg.out == Path("here")


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("epochs: 0\nlr: -1\nmode: c\ntypo_key: 1\n")
    with pytest.raises(UserError) as info:
        load_config(ToyConfig, cfg_file)
    msg = str(info.value)
    assert "5 problem(s)" in msg  # out missing, epochs, lr, mode, typo_key
    for needle in ["out", "epochs", "lr", "mode", "typo_key: unknown key"]:
        assert needle in msg


def test_missing_and_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(ToyConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(ToyConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(ToyConfig, lst)


def test_save_config_round_trip(tmp_path: Path) -> None:
    cfg = ToyConfig(out=tmp_path / "o", epochs=7)
    path = save_config(cfg, tmp_path / "o")
    assert load_config(ToyConfig, path) == cfg


def test_cli_help_lists_stages() -> None:
    out = subprocess.run([*AUTOMR, "--help"], capture_output=True, text=True, check=True).stdout
    for stage in ["prepare", "evaluate", "run"]:
        assert stage in out


def test_cli_user_error_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([*AUTOMR, "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pipeline_validates_every_stage_before_running(tmp_path: Path) -> None:
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "stages:\n"
        "  prepare: {data: /nonexistent, out: " + str(tmp_path / "d") + ", recent_k: -3}\n"
        "  nosuchstage: {}\n"
    )
    proc = subprocess.run([*AUTOMR, "run", str(spec)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "nosuchstage" in proc.stderr and "recent_k" in proc.stderr
    assert not (tmp_path / "d").exists()
