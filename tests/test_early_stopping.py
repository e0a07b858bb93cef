"""EarlyStopping (automr.utils.early_stopping): the one rule every training loop stops by."""

from __future__ import annotations

import math

import pytest

from automr.utils.early_stopping import EarlyStopping


def test_min_mode_tracks_best_and_counts_updates_without_gain() -> None:
    es = EarlyStopping(patience=2, mode="min")
    assert [es.update(v, epoch) for epoch, v in enumerate([3.0, 2.0, 2.0])] == [True, True, False]  # equal is no gain
    assert (es.best, es.best_epoch, es.bad_updates, es.should_stop) == (2.0, 1, 1, False)
    assert es.update(1.5, 3) and es.bad_updates == 0  # a gain resets the count
    assert not es.update(4.0, 4) and not es.update(1.5, 5)
    assert es.should_stop and (es.best, es.best_epoch) == (1.5, 3)


def test_max_mode_and_tuples_break_ties_with_the_second_entry() -> None:
    es = EarlyStopping(patience=5, mode="max")
    assert es.update((0.0, 0.3), 1)
    assert es.update((0.0, 0.4), 2)  # same first entry, better second
    assert not es.update((0.0, 0.35), 3)
    assert es.update((0.1, 0.0), 4)  # the first entry decides before the second
    assert (es.best, es.best_epoch, es.bad_updates) == ((0.1, 0.0), 4, 0)


def test_nan_is_the_worst_value() -> None:
    es = EarlyStopping(patience=3, mode="max")
    assert es.update(math.nan, 0)  # no best yet: the first value is the best, even NaN
    assert es.best_epoch == 0 and math.isnan(es.best)  # type: ignore[arg-type]
    assert not es.update(math.nan, 1)  # NaN never beats anything
    assert es.update(-1e9, 2)  # any number beats a NaN best
    assert not es.update(math.nan, 3) and es.best == -1e9


def test_a_starting_bound_must_be_beaten() -> None:
    """Fine-tuning starts at best = inf: a NaN or infinite first loss is not an improvement."""
    es = EarlyStopping(patience=2, mode="min", best=math.inf)
    assert not es.update(math.nan, 1) and not es.update(math.inf, 2)
    assert es.should_stop and es.best_epoch == -1
    assert es.is_better(5.0) and es.update(5.0, 3) and es.best_epoch == 3


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(patience=1, mode="up")  # type: ignore[arg-type]
