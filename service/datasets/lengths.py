"""A text dataset's token lengths, summarised against one model's maximum sequence length."""

from statistics import mean
from typing import Any

from worker.engine.modalities import modality_of_base_model


def summarise_token_lengths(
    *, base_model: str, lengths: list[int], max_length: int | None
) -> dict[str, Any]:
    """Counts, percentiles and how many texts `base_model` would truncate at `max_length`, and
    at the `max_length` a job uses when its spec leaves it out."""
    ordered = sorted(lengths)
    default = modality_of_base_model(base_model).defaults.max_length
    if default is not None and max_length is not None:
        default = min(default, max_length)

    def over(limit: int | None) -> int:
        return 0 if limit is None else sum(1 for n in ordered if n > limit)

    def percentile(share: float) -> int:
        # Nearest rank: an actual token count, not an interpolation between two.
        return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]

    return {
        "base_model": base_model,
        "max_length": max_length,
        "texts": len(ordered),
        "mean": round(mean(ordered), 1) if ordered else 0.0,
        "median": percentile(0.5) if ordered else 0,
        "p95": percentile(0.95) if ordered else 0,
        "max": ordered[-1] if ordered else 0,
        "truncated": over(max_length),
        "job_default_max_length": default,
        "truncated_at_job_default": over(default),
    }
