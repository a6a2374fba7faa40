"""A version's monitoring windows as one SVG: the shift score above, estimated and observed
accuracy below, shifted windows shaded on both. Drawn as `service/jobs/plots.py` draws: a
`Figure` of its own per request, never pyplot."""

from typing import Any

from service.jobs.plots import new_figure, render

SHIFTED_COLOR = "tab:red"


def monitoring_svg(
    windows: list[dict[str, Any]], *, title: str, validation_accuracy: float | None
) -> bytes:
    """`windows` oldest first, as `service.monitoring.service.windows_of` gives them. Each
    shifted window's band carries the SVG id `shifted-window-<seq>`."""
    figure = new_figure(figsize=(8, 5.5))
    score_axis, accuracy_axis = figure.subplots(2, 1, sharex=True)
    score_axis.set_title(title)
    score_axis.set_ylabel("shift score (MMD²)")
    accuracy_axis.set_ylabel("accuracy")
    accuracy_axis.set_xlabel("window (oldest first)")
    accuracy_axis.set_ylim(0.0, 1.05)
    if not windows:
        score_axis.text(
            0.5, 0.5, "no windows yet", ha="center", va="center", transform=score_axis.transAxes
        )
        return render(figure, "svg")
    seqs = [window["seq"] for window in windows]
    for window in windows:
        if window["shifted"]:
            for axis in (score_axis, accuracy_axis):
                band = axis.axvspan(
                    window["seq"] - 0.5,
                    window["seq"] + 0.5,
                    color=SHIFTED_COLOR,
                    alpha=0.15,
                    linewidth=0,
                )
            band.set_gid(f"shifted-window-{window['seq']}")
    tested = [window for window in windows if window["score"] is not None]
    score_axis.plot(
        [window["seq"] for window in tested],
        [window["score"] for window in tested],
        "o-",
        label="shift score",
    )
    alarms = [window for window in tested if window["shifted"]]
    score_axis.plot(
        [window["seq"] for window in alarms],
        [window["score"] for window in alarms],
        "X",
        color=SHIFTED_COLOR,
        markersize=9,
        label="shifted",
    )
    score_axis.legend(loc="upper left", fontsize=8)
    estimated = [window for window in windows if window["estimated_accuracy"] is not None]
    accuracy_axis.plot(
        [window["seq"] for window in estimated],
        [window["estimated_accuracy"] for window in estimated],
        "o-",
        label="estimated accuracy",
    )
    observed = [window for window in windows if window["observed_accuracy"] is not None]
    accuracy_axis.plot(
        [window["seq"] for window in observed],
        [window["observed_accuracy"] for window in observed],
        "s",
        color="tab:green",
        label="observed accuracy (feedback)",
    )
    if validation_accuracy is not None:
        accuracy_axis.axhline(
            validation_accuracy, color="0.5", linestyle="--", label="validation accuracy"
        )
    accuracy_axis.legend(loc="lower left", fontsize=8)
    accuracy_axis.set_xlim(seqs[0] - 0.5, seqs[-1] + 0.5)
    # Whole windows only: matplotlib would otherwise tick at halves for a few windows.
    accuracy_axis.xaxis.get_major_locator().set_params(integer=True)
    return render(figure, "svg")
