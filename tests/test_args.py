"""Shared argument groups (automr.args): one type, default and check for device, dtype and progress."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

import automr.memory
import automr.methods
import automr.stages
from automr.args import DEFAULT_DEVICE, Device, Dtype
from automr.config import StageConfig, load_config
from automr.errors import UserError
from automr.methods.registry import make_method
from automr.stages import STAGES
from automr.stages.finetune import FinetuneConfig

REPO = Path(__file__).resolve().parents[1]
DTYPE_CHOICES = "'auto', 'float32', 'bfloat16' or 'float16'"


def _all_configs() -> list[type[StageConfig]]:
    """Every config and option class of the stages, the methods and the memory package."""
    for pkg in (automr.stages, automr.methods, automr.memory):
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    found: list[type[StageConfig]] = []
    todo = [StageConfig]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            if not sub.__module__.startswith(("automr.args", "tests", "test_")):
                found.append(sub)
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__qualname__}")


CONFIGS = _all_configs()
DEVICE_FIELDS = [(c, f) for c in CONFIGS for f in c.model_fields if f == "device" or f.endswith("_device")]
DTYPE_FIELDS = [(c, f) for c in CONFIGS for f in c.model_fields if f == "dtype"]
ids = lambda pairs: [f"{c.__name__}.{f}" for c, f in pairs]


def test_the_groups_reach_every_model_stage_and_method() -> None:
    names = {c.__name__ for c, _ in DEVICE_FIELDS}
    assert {"FinetuneConfig", "BuildMemoryConfig", "AnnotateConfig", "GenerativeOptions", "TrsrOptions",
            "SasrecOptions", "RellaOptions", "RellaMethodOptions"} <= names
    assert all(s.config_class() in CONFIGS for s in STAGES)


@pytest.mark.parametrize(("cls", "field"), DEVICE_FIELDS, ids=ids(DEVICE_FIELDS))
def test_every_device_takes_auto_cpu_cuda_with_one_default(cls: type[StageConfig], field: str) -> None:
    info = cls.model_fields[field]
    assert info.default == DEFAULT_DEVICE == "auto"
    check = TypeAdapter(info.annotation)
    assert [check.validate_python(v) for v in ("auto", "cpu", "cuda")] == ["auto", "cpu", "cuda"]
    with pytest.raises(ValidationError):
        check.validate_python("gpu")
    assert set(get_args(info.annotation)) == set(get_args(Device))


@pytest.mark.parametrize(("cls", "field"), DTYPE_FIELDS, ids=ids(DTYPE_FIELDS))
def test_every_dtype_is_checked(cls: type[StageConfig], field: str) -> None:
    info = cls.model_fields[field]
    assert info.default == "auto" and set(get_args(info.annotation)) == set(get_args(Dtype))


def test_progress_is_on_by_default_everywhere() -> None:
    with_progress = [c for c in CONFIGS if "progress" in c.model_fields]
    assert len(with_progress) >= 8
    assert all(c.model_fields["progress"].default is True for c in with_progress), [
        c.__name__ for c in with_progress if c.model_fields["progress"].default is not True
    ]


def test_no_shipped_config_turns_progress_bars_off() -> None:
    def keys(node: object) -> list[tuple[str, object]]:
        if isinstance(node, dict):
            return [(k, v) for k, v in node.items()] + [kv for v in node.values() for kv in keys(v)]
        return [kv for v in node for kv in keys(v)] if isinstance(node, list) else []

    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert ("progress", False) not in keys(yaml.safe_load(path.read_text())), path.name


def test_a_dtype_typo_names_the_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"dtype: Input should be {DTYPE_CHOICES} \\(found 'bfloat61'\\)"):
        load_config(FinetuneConfig, samples=tmp_path, out=tmp_path / "o", dtype="bfloat61")
    with pytest.raises(UserError, match=f"(?s)bigrec options.*dtype: Input should be {DTYPE_CHOICES}"):
        make_method("bigrec", {"dtype": "bf16"})
    with pytest.raises(UserError, match="device: Input should be 'auto', 'cpu' or 'cuda' \\(found 'gpu'\\)"):
        make_method("sasrec", {"device": "gpu"})


def test_a_dtype_typo_on_the_command_line_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "automr.cli", "build-memory", "--samples", str(tmp_path), "--out", str(out),
         "--dtype", "float61"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert DTYPE_CHOICES in proc.stderr and "float61" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_flags_and_yaml_keys_stay_flat(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"samples: {tmp_path}\nout: {tmp_path / 'o'}\nmodel: m\ndevice: cpu\ndtype: float32\nprogress: false\n")
    cfg = load_config(FinetuneConfig, cfg_file, dtype="bfloat16")
    assert (cfg.model, cfg.device, cfg.dtype, cfg.progress) == ("m", "cpu", "bfloat16", False)
    assert {"model", "device", "dtype", "progress"} <= set(cfg.model_dump())
