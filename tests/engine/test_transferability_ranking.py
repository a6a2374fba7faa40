"""Kendall's tau, which scores LogME's ranking of backbones against their fine-tuned accuracy,
agrees with scipy's; and the ranking pipeline (bench/logme_ranking.py) runs end to end."""

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau

from bench.logme_ranking import RANDOM_PREFIX, rank_backbones
from worker.engine.transferability import kendall_tau


def test_kendall_tau_matches_scipy_with_and_without_ties() -> None:
    rng = np.random.default_rng(0)
    for size in (2, 3, 4, 7, 20):
        for _ in range(20):
            x = rng.normal(size=size)
            y = rng.integers(0, 3, size=size).astype(float)  # ties, as accuracies have
            if len(set(y)) == 1:
                continue
            assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="undefined"):
        kendall_tau([1, 2, 3], [5, 5, 5])


def test_the_ranking_pipeline_scores_fine_tunes_and_ranks(tmp_path: Path) -> None:
    """Small: pretrained Lite0 against the same network with random weights, on 10 training
    digits per class for one epoch, tested on 5 per class. LogME puts the pretrained features
    first; the fine-tuned accuracies are real measurements, too noisy at this size to order."""
    results, tau, test_size = rank_backbones(
        ["efficientnet_lite0", f"{RANDOM_PREFIX}efficientnet_lite0"],
        per_class=10,
        val_per_class=5,
        test_per_class=5,
        image_size=64,
        epochs=1,
        workdir=tmp_path,
    )
    pretrained, random = results
    assert test_size == 50
    assert (pretrained.backbone, random.backbone) == (
        "efficientnet_lite0",
        f"{RANDOM_PREFIX}efficientnet_lite0",
    )
    assert pretrained.logme > random.logme
    for result in results:
        assert 0.0 <= result.test_accuracy <= 1.0
        assert 0.0 <= result.val_accuracy <= 1.0
    if pretrained.test_accuracy != random.test_accuracy:
        expected = 1.0 if pretrained.test_accuracy > random.test_accuracy else -1.0
        assert tau == pytest.approx(expected)


def test_packaged_lite1_weights_load_into_the_zoos_timm_entry(tmp_path: Path) -> None:
    """The converted checkpoint is the one timm's `tf_efficientnet_lite1` loads strictly."""
    import torch
    from safetensors.torch import load_file

    from bench.logme_ranking import write_timm_weights
    from worker.engine.zoo import build_backbone

    write_timm_weights("tf_efficientnet_lite1", tmp_path)
    saved = load_file(tmp_path / "timm" / "tf_efficientnet_lite1.safetensors")
    backbone = build_backbone("timm:tf_efficientnet_lite1", pretrained=True, weights_dir=tmp_path)
    loaded = backbone.net.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], saved["conv_stem.weight"])
    assert torch.equal(loaded["bn2.running_var"], saved["bn2.running_var"])
