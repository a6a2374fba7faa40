"""The learning-rate range test on real digits (sklearn) with efficientnet_lite0."""

import pytest

from worker.engine import Sample, TransferConfig, compile_plan
from worker.engine.lr_find import LrFinding, lr_find, valley
from worker.engine.plan import spec_lr_for, with_found_lr


@pytest.fixture(scope="module")
def finding(digits: list[Sample]) -> LrFinding:
    plan = compile_plan(
        TransferConfig(
            base_model="efficientnet_lite0", num_classes=10, image_size=64, lr="auto", seed=3
        )
    )
    return lr_find(plan, train=digits[:300], val=digits[300:400])


def test_the_suggestion_lies_where_the_loss_falls(finding: LrFinding) -> None:
    losses, index = finding.losses, finding.suggestion_index
    print(
        f"lr_find on digits: {len(losses)} steps, suggestion {finding.suggestion:.2e} "
        f"(loss {losses[index]:.3f}; start {losses[0]:.3f}, min {min(losses):.3f} at "
        f"{finding.lrs[losses.index(min(losses))]:.2e}), diverged {finding.diverged}"
    )
    assert finding.stage == "head"
    assert finding.lrs == sorted(finding.lrs)
    assert finding.lrs[0] < 1e-6
    assert finding.suggestion == finding.lrs[index]
    # Below the start, above the bottom, and still falling a few steps on.
    lowest = losses.index(min(losses))
    assert index < lowest
    assert losses[index] < losses[0]
    assert losses[min(index + 5, lowest)] < losses[index]
    # A head on frozen features learns at rates around 1e-3; the blow-up comes later.
    assert 1e-5 < finding.suggestion < 1.0


def test_a_found_rate_rescales_the_stages_that_follow_lr(finding: LrFinding) -> None:
    plan = compile_plan(TransferConfig(base_model="efficientnet_lite0", num_classes=10, lr="auto"))
    assert finding.lr == pytest.approx(finding.suggestion)  # the first stage is the head's
    assert finding.lr is not None
    found = with_found_lr(plan, finding.lr)
    assert not found.needs_lr_finder
    assert plan.needs_lr_finder
    assert found.extra["lr"] == {"auto": finding.lr}
    head, _unfreeze = found.stages
    assert head.group_lrs == {"head": pytest.approx(finding.lr)}
    explicit = compile_plan(
        TransferConfig(base_model="efficientnet_lite0", num_classes=10, lr=finding.lr)
    )
    for ours, theirs in zip(found.stages, explicit.stages, strict=True):
        assert ours.group_lrs == pytest.approx(theirs.group_lrs)


@pytest.mark.parametrize(
    ("base_model", "strategy"),
    [("resnet18", "fine_tune"), ("minilm_l6", "fine_tune"), ("minilm_l6", "scratch")],
)
def test_a_suggested_rate_becomes_the_top_rate_of_its_stage(base_model: str, strategy: str) -> None:
    # Text scratch compiles `lr: auto` at its preset's own rate, not the modality's.
    plan = compile_plan(
        TransferConfig(base_model=base_model, num_classes=3, strategy=strategy, lr="auto")  # type: ignore[arg-type]
    )
    index = next(i for i, stage in enumerate(plan.stages) if stage.auto_lr)
    lr = spec_lr_for(plan, index, 1e-3)
    assert lr is not None
    found = with_found_lr(plan, lr).stages[index]
    assert max(found.group_lrs.values()) == pytest.approx(1e-3)


def test_valley_picks_two_thirds_down_the_longest_fall() -> None:
    losses = [2.0] * 10 + [2.0 - 0.1 * i for i in range(12)] + [1.0, 3.0, 9.0, 9.0, 9.0, 9.0, 9.0]
    lrs = [10.0**-k for k in range(len(losses), 0, -1)]
    index = valley(lrs, losses)
    assert 10 < index < 22
    assert losses[index] < 2.0
