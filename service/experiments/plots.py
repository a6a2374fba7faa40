"""Every trial's validation accuracy curve on one figure (SVG), scratch dashed, so the start,
slope and asymptote the diagnosis names can be seen. Drawn as `service/jobs/plots.py` draws:
a `Figure` of its own per request, never pyplot."""

from collections.abc import Sequence
from typing import Any

from service.jobs.plots import new_figure, render
from worker.engine.strategies import strategy_named


def trial_curves_svg(
    trials: Sequence[tuple[str, str, list[dict[str, Any]]]], *, title: str
) -> bytes:
    """`trials`: (label, strategy, epoch rows) each; one line per trial with epochs."""
    figure = new_figure(figsize=(8, 4.5))
    axis = figure.add_subplot()
    axis.set_title(title)
    axis.set_xlabel("epoch")
    axis.set_ylabel("val accuracy")
    axis.set_ylim(0.0, 1.0)
    drawn = 0
    for label, strategy, rows in trials:
        if not rows:
            continue
        axis.plot(
            [row["global_epoch"] for row in rows],
            [row["val_accuracy"] for row in rows],
            "-" if strategy_named(strategy).pretrained else "--",
            marker="o",
            label=label,
        )
        drawn += 1
    if drawn:
        axis.legend(loc="lower right", fontsize=8)
    else:
        axis.text(0.5, 0.5, "no epochs yet", ha="center", va="center", transform=axis.transAxes)
    return render(figure, "svg")
