"""The model card (`card.md`) written next to a version's weights when it is published."""

from typing import Any

from worker.engine.modalities import modality_for
from worker.engine.recipe import stage_recipes
from worker.engine.stages import Plan

# Below this many training images a class's results say little; the card names such classes.
FEW_EXAMPLES = 20
# A class recalled less often than this on validation is called out as a weak spot.
WEAK_RECALL = 0.7


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if isinstance(value, int | float) else "n/a"


def _refit(metrics: dict[str, Any]) -> str:
    refit = metrics.get("refit")
    if not refit:
        return ""
    return (
        f" These numbers are of the run that chose the recipe on validation. The published "
        f"model was then refit (`refit: true`): trained once more with that recipe (stages "
        f"{', '.join(refit['stages'])}, epochs {refit['epochs']}) on the training and "
        f"validation items together ({refit['train_items']} items), so it has seen the "
        "validation items and has no held-out score of its own; the test split, where there "
        "is one, still measures it."
    )


def _calibration(metrics: dict[str, Any]) -> str:
    calibration = metrics.get("calibration")
    if not calibration:
        return "Not measured: the probabilities are the raw softmax of the network."
    held_out = calibration.get("ece_after_held_out")
    checked = (
        f" (measured on validation images the temperature was not fitted on: {_percent(held_out)})"
        if isinstance(held_out, int | float)
        else ""
    )
    return (
        f"Predict answers temperature-scaled probabilities (T = {calibration['temperature']:.3g}, "
        "fitted on the validation split; `calibrated=false` answers the raw ones). Expected "
        f"calibration error on validation: {_percent(calibration['ece_before'])} raw, "
        f"{_percent(calibration['ece_after'])} calibrated{checked}: among images given a "
        "probability p, about p of them are right, give or take that much. This holds for "
        "images like the validation split's; on images from elsewhere the probabilities are "
        "likely too high."
    )


def _tta(metrics: dict[str, Any]) -> str:
    tta = metrics.get("tta")
    if not tta:
        return ""
    return (
        f" With test-time augmentation (`{tta['mode']}`, as predict answers) "
        f"{_percent(tta['val_accuracy'])}, without {_percent(tta['val_accuracy_without'])}."
    )


def render_card(
    *,
    model_name: str,
    job_id: str,
    dataset: dict[str, Any],
    spec: dict[str, Any],
    plan: Plan,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    onnx: dict[str, Any] | None,
    monitoring: dict[str, Any] | None = None,
) -> str:
    """Markdown: data, training, results, intended use and limits, from the job's own records."""
    counts: dict[str, dict[str, int]] = dataset.get("class_counts", {})
    classes: list[str] = list(metrics.get("classes") or dataset.get("classes", []))
    items = modality_for(plan.modality).items
    lines = [
        f"# Model card: {model_name}",
        "",
        f"Trained by job `{job_id}` from base model `{plan.base_model}` with the "
        f"`{spec.get('strategy')}` strategy.",
        "",
        "## Data",
        "",
        f"Dataset `{dataset.get('id')}` ({dataset.get('name')}): {dataset.get('num_labelled', 0)} "
        f"{items} in {len(classes)} classes.",
        "",
        "| class | train | val | total |",
        "|---|---|---|---|",
    ]
    for name in classes:
        count = counts.get(name, {})
        cells = [str(count.get(split, 0)) for split in ("train", "val", "total")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Training",
        "",
        f"- Batch size {plan.batch_size}, optimizer {plan.optimizer}, "
        f"seed {plan.seed}, pretrained backbone: {plan.pretrained}.",
        f"- Augmentation `{plan.augment}`"
        f"{'' if plan.flip else ' without flips'} (in stages that train the "
        f"backbone on images); class weights `{plan.class_weights}`, sampler "
        f"`{plan.sampler}`.",
    ]
    recipes = stage_recipes(plan)
    for stage, recipe in zip(plan.stages, recipes, strict=True):
        lines.append(
            f"- Stage `{stage.name}`: {stage.epochs} epoch(s) on "
            f"{recipe['reads']}, trains {', '.join(stage.trainable_groups)}"
            + (
                f", solved to the optimum (logistic regression by L-BFGS, C chosen by "
                f"{recipe['solver']['chosen_on']} from {recipe['solver']['c_grid']})"
                if recipe["solver"]
                else f" at a top rate of {recipe['lr']:.3g}"
            )
            + f"; BatchNorm {stage.bn_mode}; augmentation `{recipe['augment']}`."
        )
    lines.append(
        f"- Weight average (EMA): decay {plan.ema:g}, whose weights were validated and exported."
        if plan.ema
        else "- Weight average (EMA): off."
    )
    views = recipes[-1]["tta"] if recipes else None
    lines.append(
        f"- Test-time augmentation `{plan.tta}`: predict averages the probabilities of "
        f"{len(views)} views ({', '.join(views)}), as the final validation did."
        if views and len(views) > 1
        else "- Test-time augmentation: off (one view per image)."
    )
    lines += [
        "",
        "## Results",
        "",
        f"Validation accuracy {_percent(metrics.get('val_accuracy'))}, validation loss "
        f"{metrics.get('val_loss', 'n/a')}, over {len(history)} epoch(s); macro-F1 "
        f"{_percent(metrics.get('macro_f1'))} (every class counted equally).{_tta(metrics)}"
        f"{_refit(metrics)}",
        "",
        "| class | precision | recall | f1 | support |",
        "|---|---|---|---|---|",
    ]
    per_class: list[dict[str, Any]] = metrics.get("per_class", [])
    for row in per_class:
        lines.append(
            f"| {row['label']} | {_percent(row.get('precision'))} | {_percent(row.get('recall'))} "
            f"| {_percent(row.get('f1'))} | {row.get('support')} |"
        )
    lengths: dict[str, Any] | None = metrics.get("token_lengths")
    if lengths is not None:
        lines += [
            "",
            f"Texts are read up to {lengths['max_length']} tokens (truncation "
            f"`{lengths['truncation']}`). Token lengths, special tokens included:",
            "",
            "| split | texts | min | median | p95 | max | truncated |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {split} | {row['texts']} | {row['min']} | {row['median']} | {row['p95']} "
                f"| {row['max']} | {row['truncated']} |"
                for split, row in lengths.items()
                if isinstance(row, dict)
            ),
        ]
    if onnx is not None:
        lines += [
            "",
            "ONNX: "
            + (
                f"exported, max |ONNX Runtime - PyTorch| = {onnx.get('max_abs_diff'):.2g}."
                if onnx.get("exported")
                else f"not exported ({onnx.get('reason')})."
            ),
        ]
    lines += ["", "## How far the probabilities can be trusted", "", _calibration(metrics)]
    if monitoring is not None:
        lines += ["", "## Monitoring", "", _monitoring(monitoring, items)]
    lines += [
        "",
        "## Intended use",
        "",
        f"Classifying {items} into exactly these classes: {', '.join(classes)}. Every input "
        f"gets one of them, so {items} of anything else still receive a confident-looking label; "
        "check the probabilities and keep a human in the loop where mistakes are costly.",
        "",
        "## Limits",
        "",
    ]
    few = [name for name in classes if counts.get(name, {}).get("train", 0) < FEW_EXAMPLES]
    weak = [
        str(row["label"])
        for row in per_class
        if isinstance(row.get("recall"), int | float) and row["recall"] < WEAK_RECALL
    ]
    val_total = sum(count.get("val", 0) for count in counts.values())
    limits = [
        f"- Results come from {val_total} validation {items} drawn from the same upload as the "
        f"training {items}; they overstate accuracy on {items} from elsewhere."
    ]
    if few:
        limits.append(
            f"- Classes with fewer than {FEW_EXAMPLES} training {items}: {', '.join(few)}."
        )
    if weak:
        limits.append(f"- Classes recalled less than {_percent(WEAK_RECALL)}: {', '.join(weak)}.")
    return "\n".join([*lines, *limits, ""])


def _monitoring(profile: dict[str, Any], items: str) -> str:
    if not profile.get("reference"):
        return (
            "No reference profile, so predict traffic is not tested for shift "
            f"({profile.get('reason')}); accuracy is still estimated per window and observed "
            "where labels are fed back."
        )
    return (
        f"Predict traffic is tested for shift window by window against a reference of "
        f"{profile.get('rows')} validation {items} in a {profile.get('dims')}-dimensional "
        "projection of the backbone's features (MMD permutation test, significance 0.01); "
        "each window's accuracy is estimated from calibrated confidences, which promise "
        f"{_percent(profile.get('validation_expected_accuracy'))} on that sample against "
        f"{_percent(profile.get('validation_accuracy'))} measured. See "
        "`GET .../monitoring` or `thaw models monitor NAME:REF`."
    )
