"""The experiment diagnosis and its statistics on recorded curves: negative transfer raised where
transfer truly hurts and not where it clearly helps, overfitting, the intervals themselves."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from service.experiments.diagnosis import (
    EpochPoint,
    TrialRecord,
    diagnose,
    epochs_to_reach,
    overfitting,
)
from service.experiments.pruning import decide, is_rung
from service.experiments.statistics import bootstrap_interval, macro_f1

TEST_ITEMS = 200


def curve(val_accuracy: list[float], val_loss: list[float] | None = None) -> list[EpochPoint]:
    losses = val_loss or [1.0 - a for a in val_accuracy]
    return [
        EpochPoint(train_loss=1.0 / (e + 1), val_loss=loss, val_accuracy=acc)
        for e, (acc, loss) in enumerate(zip(val_accuracy, losses, strict=True))
    ]


def correct(share: float, *, seed: int) -> list[float]:
    """Per-item results with exactly `share` of TEST_ITEMS right, in a seeded order."""
    hits = round(share * TEST_ITEMS)
    values = np.array([1.0] * hits + [0.0] * (TEST_ITEMS - hits))
    np.random.default_rng(seed).shuffle(values)
    return values.tolist()


def record(strategy: str, val: list[float], test_share: float, seed: int = 0) -> TrialRecord:
    return TrialRecord(
        trial_id=f"trl_{strategy}_{seed}",
        base_model="resnet18",
        strategy=strategy,
        curve=curve(val),
        test_correct=correct(test_share, seed=seed + len(strategy)),
        wall_seconds={"scratch": 90.0, "fine_tune": 100.0, "feature_extraction": 10.0}.get(
            strategy, 50.0
        ),
    )


def comparison(diagnosis: dict, strategy: str) -> dict:
    (base,) = diagnosis["base_models"]
    return next(c for c in base["comparisons"] if c["strategy"] == strategy)


def test_negative_transfer_is_raised_where_the_pretrained_start_hurts() -> None:
    # Recorded shape of a task whose labels depend on what ImageNet features discard: the
    # frozen backbone plateaus low while scratch keeps learning.
    scratch = record("scratch", [0.30, 0.55, 0.70, 0.82, 0.88], 0.86)
    frozen = record("feature_extraction", [0.35, 0.45, 0.50, 0.52, 0.53], 0.52)
    diagnosis = diagnose([scratch, frozen])
    found = comparison(diagnosis, "feature_extraction")
    assert found["negative_transfer"] is True
    assert found["helps"] is False
    low, high = found["asymptote"]["interval"]
    assert low < found["asymptote"]["difference"] < high < 0
    assert found["asymptote"]["difference"] == pytest.approx(0.52 - 0.86)
    assert diagnosis["negative_transfer"] == ["resnet18/feature_extraction"]
    line = next(s for s in diagnosis["summary"] if "negative transfer" in s)
    # The claim carries its numbers: both accuracies, the difference and the interval.
    assert "52.0 %" in line
    assert "86.0 %" in line
    assert "-34.0 points" in line


def test_transfer_that_clearly_helps_is_not_flagged() -> None:
    scratch = record("scratch", [0.20, 0.40, 0.55, 0.62], 0.60)
    tuned = record("fine_tune", [0.80, 0.90, 0.93, 0.94], 0.93)
    frozen = record("feature_extraction", [0.75, 0.86, 0.89, 0.90], 0.90)
    diagnosis = diagnose([scratch, tuned, frozen])
    for strategy in ("fine_tune", "feature_extraction"):
        found = comparison(diagnosis, strategy)
        assert found["negative_transfer"] is False
        assert found["helps"] is True
        assert found["asymptote"]["interval"][0] > 0
    assert diagnosis["negative_transfer"] == []
    tuned_found = comparison(diagnosis, "fine_tune")
    assert tuned_found["start"]["difference"] == pytest.approx(0.60)
    # 90 % of scratch's best (0.62) is 0.558: fine_tune is there after 1 epoch, scratch after 4.
    assert tuned_found["slope"]["epochs_to_threshold"] == {"transfer": 1, "scratch": 4}
    assert tuned_found["slope"]["area_under_val_curve"]["transfer"] == pytest.approx(0.8925)
    assert any("beat scratch" in s and "fine_tune" in s for s in diagnosis["summary"])
    # feature extraction: 0.90 / 0.93 = 97 % of the best at a tenth of the wall time.
    assert any(
        "fine_tune: reached 90 % of scratch's best" in s and "in 1 epoch (" in s
        for s in diagnosis["summary"]
    )
    assert any(
        "feature_extraction reached 97% of fine_tune" in s and "1/10.0" in s
        for s in diagnosis["summary"]
    )


def test_an_equal_result_raises_neither_flag() -> None:
    scratch = record("scratch", [0.5, 0.7, 0.8], 0.80)
    same = record("partial", [0.6, 0.75, 0.8], 0.80, seed=1)  # other items right
    found = comparison(diagnose([scratch, same]), "partial")
    assert not found["negative_transfer"]
    assert not found["helps"]
    low, high = found["asymptote"]["interval"]
    assert low < 0 < high


def test_seeds_are_pooled_and_missing_scratch_is_said() -> None:
    runs = [record("fine_tune", [0.8, 0.9], 0.9, seed=s) for s in range(3)]
    diagnosis = diagnose(runs)
    (base,) = diagnosis["base_models"]
    assert base["scratch"] is None
    assert base["comparisons"] == []
    assert any("no finished scratch trial" in s for s in diagnosis["summary"])
    pooled = diagnose([*runs, record("scratch", [0.4, 0.6], 0.6)])
    assert comparison(pooled, "fine_tune")["trials"] == 3


def test_overfitting_needs_val_loss_up_while_train_loss_goes_down() -> None:
    diverging = curve([0.7, 0.8, 0.8, 0.79], val_loss=[0.6, 0.4, 0.5, 0.6])
    flagged = overfitting(diverging)
    assert flagged["flag"] is True
    assert flagged["best_val_loss_epoch"] == 2
    assert flagged["val_loss_rise"] == pytest.approx(0.5)
    assert overfitting(curve([0.5, 0.6, 0.7], val_loss=[0.9, 0.7, 0.5]))["flag"] is False
    scratch = record("scratch", [0.4, 0.6, 0.6, 0.6], 0.6)
    overfit = TrialRecord(
        trial_id="trl_over",
        base_model="resnet18",
        strategy="fine_tune",
        curve=diverging,
        test_correct=correct(0.8, seed=3),
        wall_seconds=5.0,
    )
    diagnosis = diagnose([scratch, overfit])
    assert any("overfitting" in s and "trl_over" in s for s in diagnosis["summary"])


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    values = correct(0.7, seed=1) * 10  # 2000 items, 70 % right
    low, high = bootstrap_interval(values, seed=3)
    half_width = 1.96 * math.sqrt(0.7 * 0.3 / len(values))
    assert low == pytest.approx(0.7 - half_width, abs=0.006)
    assert high == pytest.approx(0.7 + half_width, abs=0.006)
    assert bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError, match=r"^a bootstrap interval needs at least one value$"):
        bootstrap_interval([])


def test_bootstrap_interval_is_the_percentile_bootstrap_exactly() -> None:
    """Written out independently: resample indices 0..n-1 with the seeded generator, and take
    the 2.5th and 97.5th percentiles of the resampled means."""
    values = np.random.default_rng(4).normal(size=50)
    indices = np.random.default_rng(0).integers(0, values.size, size=(500, values.size))
    expected = np.quantile(values[indices].mean(axis=1), [0.025, 0.975])
    assert bootstrap_interval(values.tolist(), resamples=500) == pytest.approx(tuple(expected))
    assert bootstrap_interval(values.tolist(), seed=1, resamples=500) != tuple(expected)
    # Every item can be drawn, the first too; a single resample is an interval of one mean.
    assert bootstrap_interval([1.0, 0.0], resamples=200) == (0.0, 1.0)
    single = bootstrap_interval(values.tolist(), resamples=1)
    assert single[0] == single[1]


def test_macro_f1_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, size=300)
    predictions = np.where(rng.random(300) < 0.6, targets, rng.integers(0, 4, size=300))
    assert macro_f1(targets.tolist(), predictions.tolist(), 4) == pytest.approx(
        f1_score(targets, predictions, average="macro")
    )


def test_macro_f1_skips_absent_classes_and_scores_unpredicted_ones_zero() -> None:
    # Class 0 perfect, class 1 absent from the targets (not averaged), class 2 perfect with
    # one item, class 3 never predicted (scores 0): (1 + 1 + 0) / 3.
    assert macro_f1([0, 0, 2, 3], [0, 0, 2, 1], 4) == pytest.approx(2 / 3)
    assert macro_f1([], [], 3) == 0.0


def test_successive_halving_keeps_the_top_half_at_each_rung() -> None:
    peers = {"a": [0.9, 0.92], "b": [0.8, 0.85], "c": [0.3, 0.35]}
    # At epoch 1 with three peers (four trials): the top two are 0.9 and 0.8.
    pruned = decide(strategy="fine_tune", val_accuracy=[0.5], peers=peers)
    assert pruned is not None
    assert (pruned.epoch, pruned.cutoff, pruned.peers) == (1, 0.8, 4)
    assert "0.500 below 0.800" in pruned.reason
    assert decide(strategy="fine_tune", val_accuracy=[0.85], peers=peers) is None
    # Scratch is the baseline: never pruned. Epoch 3 is no rung.
    assert decide(strategy="scratch", val_accuracy=[0.1], peers=peers) is None
    assert decide(strategy="partial", val_accuracy=[0.9, 0.9, 0.1], peers=peers) is None
    # Too few trials at the rung to judge.
    assert decide(strategy="partial", val_accuracy=[0.1], peers={"a": [0.9]}) is None
    assert [e for e in range(1, 17) if is_rung(e)] == [1, 2, 4, 8, 16]


def test_the_cost_line_compares_with_the_leader_ties_going_to_the_cheaper() -> None:
    scratch = record("scratch", [0.2, 0.4], 0.40)
    slow = record("fine_tune", [0.8, 0.9], 0.90)  # 100 s
    fast = record("partial", [0.8, 0.9], 0.90)  # 50 s: the leader
    frozen = record("feature_extraction", [0.8, 0.88], 0.88)  # 10 s
    summary = diagnose([scratch, slow, fast, frozen])["summary"]
    cost = [s for s in summary if "of its wall time" in s]
    assert cost == [
        "resnet18/feature_extraction reached 98% of partial's test accuracy (88.0 % vs 90.0 %) "
        "at 1/5.0 of its wall time (10.0 s vs 50.0 s)."
    ]


def arm_record(
    strategy: str,
    val: list[float],
    test_correct: list[float] | None,
    *,
    seed: int = 0,
    wall_seconds: float | None = None,
    base_model: str = "resnet18",
) -> TrialRecord:
    return TrialRecord(
        trial_id=f"trl_{base_model}_{strategy}_{seed}",
        base_model=base_model,
        strategy=strategy,
        curve=curve(val),
        test_correct=test_correct,
        wall_seconds=wall_seconds,
    )


def test_the_whole_diagnosis_of_one_comparison_written_out() -> None:
    """Scratch pooled over two seeds of different lengths (its third epoch from one seed only);
    every number of the comparison and every word of its lines, computed here by hand."""
    scratch_items = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    tuned_items = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    records = [
        arm_record("scratch", [0.2, 0.4, 0.6], scratch_items, seed=0, wall_seconds=80.0),
        arm_record("scratch", [0.4, 0.6], scratch_items, seed=1, wall_seconds=100.0),
        arm_record("fine_tune", [0.5, 0.7], tuned_items, wall_seconds=60.0),
    ]
    difference = np.array(tuned_items) - np.array(scratch_items)
    low, high = bootstrap_interval(difference.tolist(), seed=7)
    diagnosis = diagnose(records, seed=7)

    (base,) = diagnosis["base_models"]
    assert base["base_model"] == "resnet18"
    assert base["scratch"] == {"trials": 2, "best_val_accuracy": 0.6, "test_accuracy": 0.375}
    (found,) = base["comparisons"]
    assert found["strategy"] == "fine_tune"
    assert found["trials"] == 1
    assert found["start"] == pytest.approx({"transfer": 0.5, "scratch": 0.3, "difference": 0.2})
    # Scratch pooled: [0.3, 0.5, 0.6]; 90 % of its best is 0.54.
    assert found["slope"]["threshold"] == pytest.approx(0.54)
    assert found["slope"]["epochs_to_threshold"] == {"transfer": 2, "scratch": 3}
    area = found["slope"]["area_under_val_curve"]
    assert area == {"epochs": 2, "transfer": pytest.approx(0.6), "scratch": pytest.approx(0.4)}
    assert found["asymptote"] == {
        "transfer": 0.75,
        "scratch": 0.375,
        "difference": 0.375,
        "interval": [low, high],
        "test_items": 8,
    }
    assert (found["negative_transfer"], found["helps"]) == (high < 0, low > 0)
    assert found["cost"] == {"wall_seconds": {"transfer": 60.0, "scratch": 90.0}}
    assert diagnosis["summary"][:3] == [
        "resnet18/fine_tune: start 50.0 % val accuracy after epoch 1 against scratch's 30.0 %.",
        "resnet18/fine_tune: reached 90 % of scratch's best val accuracy (54.0 %) in 2 epochs "
        "(scratch: 3 epochs); area under the val curve 0.600 vs 0.400 over 2 epochs.",
        "resnet18/fine_tune: "
        + ("beat scratch" if low > 0 else "no clear difference from scratch")
        + f" (test accuracy 75.0 % vs 37.5 % on 8 items, difference 37.5 points, 95 % interval "
        f"{100 * low:.1f} to {100 * high:.1f}).",
    ]


def test_lines_for_a_slow_transfer_and_no_test_results() -> None:
    """Transfer reached the threshold in one epoch, scratch never did (its best is under its
    own threshold only when pooled), and nothing was evaluated on the test split."""
    records = [
        arm_record("scratch", [0.1, 0.5], None, seed=0),
        arm_record("scratch", [0.5, 0.1], None, seed=1),
        arm_record("partial", [0.9, 0.2, 0.2], None),
    ]
    diagnosis = diagnose(records)
    (base,) = diagnosis["base_models"]
    assert base["scratch"] == {"trials": 2, "best_val_accuracy": 0.3, "test_accuracy": None}
    (found,) = base["comparisons"]
    assert found["asymptote"] is None
    assert (found["negative_transfer"], found["helps"]) == (False, False)
    assert found["cost"] == {"wall_seconds": {"transfer": None, "scratch": None}}
    assert found["slope"]["epochs_to_threshold"] == {"transfer": 1, "scratch": 1}
    assert diagnosis["summary"] == [
        "resnet18/partial: start 90.0 % val accuracy after epoch 1 against scratch's 30.0 %.",
        "resnet18/partial: reached 90 % of scratch's best val accuracy (27.0 %) in 1 epoch "
        "(scratch: 1 epoch); area under the val curve 0.550 vs 0.300 over 2 epochs.",
        "resnet18/partial: no test result to compare with scratch.",
        # Each trial is judged for overfitting on its own curve, not the pooled one.
        "resnet18/scratch (trl_resnet18_scratch_1): overfitting: val loss rose 80% after epoch 1 "
        "(0.500 → 0.900) while train loss fell (1.000 → 0.500).",
        "resnet18/partial (trl_resnet18_partial_0): overfitting: val loss rose 700% after epoch "
        "1 (0.100 → 0.800) while train loss fell (1.000 → 0.333).",
    ]
    never = diagnose(
        [arm_record("scratch", [0.5, 0.8], None), arm_record("partial", [0.1, 0.2], None)]
    )
    assert never["summary"][1] == (
        "resnet18/partial: reached 90 % of scratch's best val accuracy (72.0 %) in no epoch "
        "(scratch: 2 epochs); area under the val curve 0.150 vs 0.650 over 2 epochs."
    )


def test_seeds_evaluated_on_test_splits_of_different_sizes_are_not_compared() -> None:
    records = [
        arm_record("scratch", [0.5], [1.0, 0.0], seed=0),
        arm_record("scratch", [0.5], [1.0, 0.0, 1.0], seed=1),
        arm_record("fine_tune", [0.7], [1.0, 1.0]),
        # A trial without a curve (it never finished an epoch) is left out entirely.
        arm_record("fine_tune", [], [0.0, 0.0], seed=1),
    ]
    (base,) = diagnose(records)["base_models"]
    assert base["scratch"]["test_accuracy"] is None
    assert base["comparisons"][0]["asymptote"] is None
    assert base["comparisons"][0]["trials"] == 1


def test_negative_transfer_is_listed_per_base_model() -> None:
    bad = [0.0] * 40
    good = [1.0] * 40
    records = [
        arm_record("scratch", [0.9], good, base_model="resnet18"),
        arm_record("feature_extraction", [0.2], bad, base_model="resnet18"),
        arm_record("scratch", [0.9], good, base_model="vit_b_16"),
        arm_record("fine_tune", [0.9], good, base_model="vit_b_16"),
        arm_record("feature_extraction", [0.2], bad, base_model="vit_b_16"),
    ]
    diagnosis = diagnose(records)
    assert [b["base_model"] for b in diagnosis["base_models"]] == ["resnet18", "vit_b_16"]
    assert diagnosis["negative_transfer"] == [
        "resnet18/feature_extraction",
        "vit_b_16/feature_extraction",
    ]
    assert diagnosis["summary"][2] == (
        "resnet18/feature_extraction: negative transfer: worse than scratch (test accuracy "
        "0.0 % vs 100.0 % on 40 items, difference -100.0 points, 95 % interval -100.0 to -100.0)."
    )


def test_epochs_to_reach_counts_the_epoch_that_meets_the_threshold_exactly() -> None:
    assert epochs_to_reach([0.5, 0.9, 1.0], 0.9) == 2
    assert epochs_to_reach([0.5, 0.8], 0.9) is None


def test_overfitting_on_its_edges() -> None:
    assert overfitting(curve([0.5])) == {"flag": False, "reason": "fewer than two epochs"}
    # Two epochs are enough to see it.
    two = overfitting(curve([0.8, 0.7], val_loss=[0.4, 0.5]))
    assert two == {
        "flag": True,
        "best_val_loss_epoch": 1,
        "best_val_loss": 0.4,
        "last_val_loss": 0.5,
        "val_loss_rise": pytest.approx(0.25),
        "train_loss_at_best": 1.0,
        "last_train_loss": 0.5,
    }
    # A rise of 10 % or less is noise, however the train loss went (0.0625 / 0.625 is exactly
    # the float 0.1).
    small = overfitting(curve([0.7, 0.8, 0.8], val_loss=[0.8, 0.625, 0.6875]))
    assert (small["flag"], small["val_loss_rise"]) == (False, 0.1)
    # Train loss that did not fall after the best epoch is not divergence.
    flat_train = [
        EpochPoint(train_loss=0.5, val_loss=0.4, val_accuracy=0.8),
        EpochPoint(train_loss=0.5, val_loss=0.6, val_accuracy=0.7),
    ]
    assert overfitting(flat_train)["flag"] is False
    # A zero best val loss does not divide by zero.
    assert overfitting(curve([1.0, 0.9], val_loss=[0.0, 0.1]))["flag"] is True


def test_the_interval_is_the_bootstrap_of_the_paired_differences_at_the_given_seed() -> None:
    # Per-item results averaged over seeds are fractions, so the seed changes the interval.
    rng = np.random.default_rng(5)
    scratch_items, tuned_items = rng.random(30).tolist(), rng.random(30).tolist()
    records = [
        arm_record("scratch", [0.5], scratch_items),
        arm_record("fine_tune", [0.6], tuned_items),
    ]
    difference = (np.array(tuned_items) - np.array(scratch_items)).tolist()
    at_seven = comparison(diagnose(records, seed=7), "fine_tune")["asymptote"]["interval"]
    assert at_seven == list(bootstrap_interval(difference, seed=7))
    assert at_seven != list(bootstrap_interval(difference, seed=0))
    by_default = comparison(diagnose(records), "fine_tune")["asymptote"]["interval"]
    assert by_default == list(bootstrap_interval(difference, seed=0))


def test_an_interval_that_only_touches_zero_is_no_clear_difference() -> None:
    # Transfer right on one item more of ten: resamples without it have a difference of
    # exactly 0, so the interval's low end is 0.0, which does not show transfer helps.
    records = [
        arm_record("scratch", [0.5], [0.0] * 10),
        arm_record("fine_tune", [0.5], [0.0] * 9 + [1.0]),
    ]
    diagnosis = diagnose(records)
    found = comparison(diagnosis, "fine_tune")
    assert found["asymptote"]["interval"][0] == 0.0
    assert (found["helps"], found["negative_transfer"]) == (False, False)
    assert diagnosis["summary"][2].startswith(
        "resnet18/fine_tune: no clear difference from scratch (test accuracy 10.0 % vs 0.0 %"
    )


def test_two_timed_arms_are_enough_for_a_cost_line() -> None:
    two = diagnose(
        [
            arm_record("scratch", [0.8], [1.0] * 44 + [0.0] * 6, wall_seconds=10.0),
            arm_record("fine_tune", [0.9], [1.0] * 45 + [0.0] * 5, wall_seconds=100.0),
        ]
    )
    assert two["summary"][-1] == (
        "resnet18/scratch reached 98% of fine_tune's test accuracy (88.0 % vs 90.0 %) at "
        "1/10.0 of its wall time (10.0 s vs 100.0 s)."
    )
    # The cost line's edges: exactly 95 % of the leader counts; the leader's own wall time
    # is no saving.
    edges = diagnose(
        [
            arm_record("scratch", [0.8], [1.0] * 19 + [0.0], wall_seconds=10.0),
            arm_record("fine_tune", [0.9], [1.0] * 20, wall_seconds=100.0),
            arm_record("partial", [0.9], [1.0] * 19 + [0.0], wall_seconds=100.0),
        ]
    )
    assert [line for line in edges["summary"] if "wall time" in line] == [
        "resnet18/scratch reached 95% of fine_tune's test accuracy (95.0 % vs 100.0 %) at "
        "1/10.0 of its wall time (10.0 s vs 100.0 s)."
    ]


def test_a_base_model_without_scratch_says_so_in_full() -> None:
    diagnosis = diagnose([arm_record("fine_tune", [0.8], None, base_model="vit_b_16")])
    assert diagnosis["summary"] == [
        "vit_b_16: no finished scratch trial, so transfer cannot be judged against training "
        "from scratch."
    ]
