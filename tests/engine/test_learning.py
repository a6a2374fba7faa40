"""Does transfer actually help, and does LwF remember? Real digits (sklearn) as PNG uploads."""

import time
from pathlib import Path

import numpy as np
from PIL import Image

from worker.engine import (
    ParentModel,
    Predictor,
    Sample,
    StageSpec,
    TransferConfig,
    compile_plan,
    export_model,
    run,
)


def test_feature_extraction_learns_digits(digits: list[Sample]) -> None:
    train, val = digits[:600], digits[600:900]
    plan = compile_plan(
        TransferConfig(
            base_model="efficientnet_lite0",
            strategy="feature_extraction",
            num_classes=10,
            image_size=64,
            epochs=10,
            lr=3e-3,
        )
    )

    started = time.perf_counter()
    result = run(plan, train=train, val=val, classes=[str(d) for d in range(10)])
    seconds = time.perf_counter() - started

    accuracy = result.metrics["val_accuracy"]
    print(f"digits feature_extraction@64px: val accuracy {accuracy:.4f} in {seconds:.1f}s")
    assert accuracy >= 0.85


def _accuracy(predictor: Predictor, samples: list[Sample], task: str) -> float:
    predictions = predictor.predict([Image.open(s.path) for s in samples], top_k=1, task=task)
    labels = predictor.tasks[task]
    return float(
        np.mean(
            [labels.index(p[0][0]) == s.label for p, s in zip(predictions, samples, strict=True)]
        )
    )


def test_lwf_remembers_the_old_task_where_fine_tuning_forgets(
    digits: list[Sample], tmp_path: Path
) -> None:
    """Li & Hoiem's claim on a small scale: old task digits 0-4, new task digits 5-9.

    Both runs start from the same old model and train the same stages at the same rates; the
    fine-tuned backbone is judged on the old task with the old model's head, as in the paper.
    """
    size = 150
    low = [s for s in digits if s.label < 5]
    high = [Sample(s.path, s.label - 5) for s in digits if s.label >= 5]
    common = {"num_classes": 5, "image_size": 64, "batch_size": 32, "lr": 3e-3}
    old_plan = compile_plan(
        TransferConfig(
            base_model="efficientnet_lite0",
            strategy="feature_extraction",
            epochs=10,
            task_name="low",
            **common,
        )
    )
    old = run(old_plan, train=low[:size], val=low[size : 2 * size], classes=list("01234"))
    export_model(old, old_plan, tmp_path / "old")
    assert old.metrics["val_accuracy"] >= 0.85

    stages = (StageSpec(groups=("head",), lr=3e-3), StageSpec(groups=("all",), epochs=3, lr=1e-3))
    scores = {}
    for strategy in ("lwf", "fine_tune"):
        plan = compile_plan(
            TransferConfig(
                base_model="model:digits:1",
                strategy=strategy,  # type: ignore[arg-type]
                parent=ParentModel.from_folder(tmp_path / "old"),
                stages=stages,
                task_name="high",
                **common,
            )
        )
        result = run(
            plan,
            train=high[:size],
            val=high[size : 2 * size],
            classes=list("56789"),
            parent_dir=tmp_path / "old",
        )
        export_model(result, plan, tmp_path / strategy)
        predictor = Predictor.load(
            tmp_path / "old" if strategy == "fine_tune" else tmp_path / strategy
        )
        if strategy == "fine_tune":
            # The old model's head on the fine-tuned backbone: what fine-tuning did to task 1.
            predictor.model.backbone.load_state_dict(result.model.backbone.state_dict())
        scores[strategy] = (
            _accuracy(predictor, low[size : 2 * size], "low"),
            result.metrics["val_accuracy"],
        )
        old_accuracy, new_accuracy = scores[strategy]
        print(f"{strategy}: old-task accuracy {old_accuracy:.3f}, new-task {new_accuracy:.3f}")

    (lwf_old, lwf_new), (tuned_old, tuned_new) = scores["lwf"], scores["fine_tune"]
    assert lwf_old >= tuned_old + 0.15
    assert lwf_new >= tuned_new - 0.1
    assert lwf_new >= 0.7
