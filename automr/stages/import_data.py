"""`automr import-data`: convert raw data (Amazon 2018, MovieLens) to the common format (automr/data/readers.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from automr.config import StageConfig
from automr.data.readers import MOVIELENS_FILES, Kind, convert_raw



class ImportConfig(StageConfig):
    """Settings of `automr import-data`: which raw files to read and where to write."""

    kind: Kind = Field(description="Raw format: amazon2018, ml-100k or ml-1m.")
    out: Path = Field(description="Output folder (common format); replaced atomically when the import succeeds.")
    source: Path | None = Field(
        None, description="MovieLens: folder with u.data + u.item (ml-100k) or ratings.dat + movies.dat (ml-1m)."
    )
    reviews: Path | None = Field(None, description="Amazon 2018: reviews JSON lines (.json or .json.gz).")
    meta: Path | None = Field(None, description="Amazon 2018: metadata JSON lines with asin and title (.json or .json.gz).")
    strict: bool = Field(
        False,
        description="Stop at the first malformed JSON line or record missing a field (error names file and line) "
        "instead of skipping and counting it.",
    )
    require_titles: bool = Field(
        False, description="Fail if any reviewed item has no title, instead of dropping it with its interactions."
    )
    memory_limit: str = Field("4GB", description="DuckDB memory limit; beyond it DuckDB spills to a temp folder next to OUT.")
    threads: int | None = Field(None, ge=1, description="DuckDB threads (default: all cores).")

    @model_validator(mode="after")
    def _inputs_for_kind(self) -> "ImportConfig":
        if self.kind == "amazon2018":
            missing = [f for f in ("reviews", "meta") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"kind amazon2018 needs --reviews FILE and --meta FILE; missing: {', '.join(missing)}")
            if self.source is not None:
                raise ValueError("kind amazon2018 reads --reviews and --meta, not --source; remove --source")
        else:
            if self.source is None:
                files = " + ".join(MOVIELENS_FILES[self.kind])
                raise ValueError(f"kind {self.kind} needs --source FOLDER holding {files}")
            extra = [f for f in ("reviews", "meta") if getattr(self, f) is not None]
            if extra:
                raise ValueError(f"kind {self.kind} reads --source only; remove {', '.join('--' + e for e in extra)}")
        return self


def run_import(cfg: ImportConfig) -> dict[str, Any]:
    """Stage entry point of `automr import-data`."""
    return convert_raw(
        cfg.kind,
        out=cfg.out,
        source=cfg.source,
        reviews=cfg.reviews,
        meta=cfg.meta,
        strict=cfg.strict,
        require_titles=cfg.require_titles,
        memory_limit=cfg.memory_limit,
        threads=cfg.threads,
        config=cfg,
    )


