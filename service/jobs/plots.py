"""Training curves (SVG) and confusion matrices (PNG), drawn with matplotlib's Agg backend.

Figures are built with `matplotlib.figure.Figure` directly, never pyplot: pyplot keeps global
state that concurrent requests in the API's thread pool would trample.
"""

import io
import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from service.errors import ApiError
from service.jobs.history import epoch_history, epoch_rows
from service.tables import Job, ModelVersion

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_configured = threading.Lock()
_figure_class: "type[Figure] | None" = None


def new_figure(**options: Any) -> "Figure":
    """A constrained-layout `Figure` (`options` as `Figure` takes them). matplotlib is imported
    and configured on the first figure of the process, not at import: it costs a few tenths of
    a second that every API and worker start would pay, most of them never drawing."""
    global _figure_class
    with _configured:
        if _figure_class is None:
            _figure_class = _configured_matplotlib()
    return _figure_class(layout="constrained", **options)


def _configured_matplotlib() -> "type[Figure]":
    import matplotlib
    from matplotlib.figure import Figure

    # No display here: should anything reach for pyplot, it must not try to open a window.
    matplotlib.use("Agg")
    # SVG text as text, not paths: smaller files, and the labels stay searchable and testable.
    matplotlib.rcParams["svg.fonttype"] = "none"
    # Text is drawn as written: class labels, stage and model names are the clients' words, and
    # matplotlib would read `$...$` in them as math (a label `$\undefinedmacro$` failed the
    # whole plot) or, with usetex, hand them to TeX. Set once per process, before its first
    # figure (a per-figure `rc_context` would race between the API's threads); every Text made
    # later reads it, titles, tick labels and legends included.
    matplotlib.rcParams["text.parse_math"] = False
    matplotlib.rcParams["text.usetex"] = False
    return Figure


def render(figure: "Figure", fmt: str) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=100)
    return buffer.getvalue()


def curves_svg(events: list[dict[str, Any]], *, title: str) -> bytes:
    """Train/val loss (left axis) and val accuracy (right axis) per epoch; stages are shaded."""
    rows = epoch_rows(events)
    figure = new_figure(figsize=(8, 4.5))
    loss_axis = figure.add_subplot()
    loss_axis.set_title(title)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss")
    if not rows:
        loss_axis.text(
            0.5, 0.5, "no epochs yet", ha="center", va="center", transform=loss_axis.transAxes
        )
        return render(figure, "svg")
    epochs = [row["global_epoch"] for row in rows]
    loss_axis.plot(epochs, [row["train_loss"] for row in rows], "o-", label="train loss")
    loss_axis.plot(epochs, [row["val_loss"] for row in rows], "s-", label="val loss")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.set_ylabel("val accuracy")
    accuracy_axis.set_ylim(0.0, 1.0)
    accuracy_axis.plot(
        epochs,
        [row["val_accuracy"] for row in rows],
        "^--",
        color="tab:green",
        label="val accuracy",
    )
    for index, (start, end, name) in enumerate(_stage_spans(rows)):
        if index % 2:
            loss_axis.axvspan(start - 0.5, end + 0.5, color="0.93", zorder=0)
        if index:
            loss_axis.axvline(start - 0.5, color="0.5", linestyle=":")
        loss_axis.text(
            start - 0.45,
            1.0,
            f"stage: {name}",
            transform=loss_axis.get_xaxis_transform(),
            va="bottom",
            fontsize=8,
            color="0.3",
        )
    loss_axis.set_xticks(epochs)
    # Stage labels sit at the left edge of each stage's band, inside the axes.
    loss_axis.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    handles = loss_axis.get_legend_handles_labels()
    extra = accuracy_axis.get_legend_handles_labels()
    loss_axis.legend(handles[0] + extra[0], handles[1] + extra[1], loc="center right")
    return render(figure, "svg")


def _stage_spans(rows: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    spans: list[tuple[int, int, str]] = []
    for row in rows:
        epoch, stage = int(row["global_epoch"]), str(row["stage"])
        if spans and spans[-1][2] == stage:
            spans[-1] = (spans[-1][0], epoch, stage)
        else:
            spans.append((epoch, epoch, stage))
    return spans


def confusion_png(matrix: list[list[int]], labels: list[str], *, title: str) -> bytes:
    """Counts per (true, predicted) class, rows true; cells annotated when the grid is small."""
    size = len(labels)
    side = min(max(4.0, 0.45 * size + 2.0), 16.0)
    figure = new_figure(figsize=(side, side))
    axis = figure.add_subplot()
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis, shrink=0.8)
    axis.set_title(title)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_xticks(range(size), labels, rotation=90 if size > 6 else 0)
    axis.set_yticks(range(size), labels)
    if size <= 30:
        peak = max((max(row) for row in matrix), default=0)
        for true_index, row in enumerate(matrix):
            for predicted_index, count in enumerate(row):
                color = "white" if peak and count > peak / 2 else "black"
                axis.text(
                    predicted_index,
                    true_index,
                    str(count),
                    ha="center",
                    va="center",
                    color=color,
                    fontsize=8,
                )
    return render(figure, "png")


def lr_find_svg(finding: dict[str, Any], *, title: str) -> bytes:
    """A learning-rate range test: smoothed loss against the rate (log scale), the suggestion
    marked."""
    figure = new_figure(figsize=(8, 4.5))
    axis = figure.add_subplot()
    axis.set_title(title)
    axis.set_xscale("log")
    axis.set_xlabel(f"learning rate (stage {finding['stage']}, top group)")
    axis.set_ylabel("smoothed training loss")
    axis.plot(finding["lrs"], finding["losses"], "-", label="loss")
    index = finding["suggestion_index"]
    axis.plot(
        [finding["suggestion"]],
        [finding["losses"][index]],
        "o",
        color="tab:red",
        label=f"suggestion {finding['suggestion']:.2e}",
    )
    axis.legend(loc="upper left")
    return render(figure, "svg")


def job_curves_svg(session: Session, *, job: Job) -> bytes:
    rows = epoch_history(session, job_id=job.id)
    return curves_svg(rows, title=f"{job.model_name} · {job.strategy} · {job.id}")


def job_lr_find_svg(session: Session, *, job: Job) -> bytes:
    # Imported here: the service module imports the engine's spec, which this module need not.
    from service.jobs.service import lr_finding

    return lr_find_svg(lr_finding(session, job=job), title=f"learning-rate finder · {job.id}")


def job_confusion_png(session: Session, *, job: Job) -> bytes:
    version = session.get(ModelVersion, job.model_version_id) if job.model_version_id else None
    if version is None:
        detail = (
            "its model version was deleted"
            if job.model_version_id
            else f"it is {job.status} and has published no model version"
        )
        raise ApiError(
            409,
            "no_model_yet",
            f"Job {job.id} has no confusion matrix: {detail}.",
            "job_id",
        )
    matrix = version.metrics.get("confusion_matrix")
    if not matrix:
        raise ApiError(
            409,
            "no_model_yet",
            f"Version {version.version} recorded no confusion matrix.",
            "job_id",
        )
    return confusion_png(
        matrix, list(version.labels), title=f"{job.model_name} v{version.version} (validation)"
    )
