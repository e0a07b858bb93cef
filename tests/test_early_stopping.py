"""EarlyStopping (automr.utils.early_stopping): the one rule every training loop stops by."""

from __future__ import annotations

import math

import pytest

from automr.utils.early_stopping import MIN_HITS, Criterion, EarlyStopping, warn_if_thin


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


def test_criterion_says_what_it_rests_on() -> None:
    """Issue 9 A9: every validation is logged with its value, its samples and, for a hit rate, its hits."""
    hit_based = Criterion("ndcg@10", 0.04123, 6040, 311, "hits@10")
    assert hit_based.describe() == "valid ndcg@10 0.0412 from 311 hits@10 of 6,040 samples"
    assert hit_based.record() == {"criterion": "ndcg@10", "criterion_value": 0.04123, "criterion_samples": 6040, "criterion_hits": 311}
    loss = Criterion("loss", 2.31456, 256, note="2,981 answer tokens")
    assert loss.describe() == "valid loss 2.3146 over 256 samples (2,981 answer tokens)"
    assert loss.record()["criterion_hits"] is None
    assert Criterion("callback", 0.5).describe() == "valid callback 0.5000"  # a bare float from a callback
    # Thin: a hit rate on fewer than MIN_HITS hits; a loss never is.
    assert Criterion("recall@1", 0.001, 857, MIN_HITS - 1, "hits@1").thin
    assert not Criterion("recall@1", 0.1, 857, MIN_HITS, "hits@1").thin and not loss.thin


def test_warn_if_thin_names_the_epoch_the_evidence_and_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    one_hit = Criterion("recall@1", 1 / 857, 857, 1, "hits@1")
    assert warn_if_thin("sasrec", one_hit, 2, "Stop on ndcg@10.")
    err = capsys.readouterr().err
    assert err.startswith("warning: sasrec: the best epoch (2) was chosen on valid recall@1 0.0012 from 1 hits@1 of 857 samples")
    assert f"fewer than {MIN_HITS} hits" in err and "Stop on ndcg@10." in err
    assert not warn_if_thin("sasrec", Criterion("ndcg@10", 0.04, 6040, 311, "hits@10"), 9, "")
    assert not warn_if_thin("finetune", Criterion("loss", 2.3, 8), 1, "")
    assert capsys.readouterr() == ("", "")
