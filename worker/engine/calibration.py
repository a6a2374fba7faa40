"""Temperature scaling (Guo et al. 2017): how far a model's probabilities can be trusted.

A network trained with cross-entropy is usually over-confident: among the images it calls
90% likely, fewer than 90% are right. Dividing its logits by one temperature T > 1, fitted to
minimise the negative log-likelihood on the validation split, fixes most of that without
changing any prediction (argmax is unchanged by a positive scale). The expected calibration
error (ECE) measures the gap: the mean |accuracy - confidence| over confidence bins, weighted
by how many images fall in each bin.

Fitted once at the end of training on the kept model's validation logits; the temperature is
written to `config.json` (`artifacts.ModelConfig.temperature`) and both predict backends
divide the newest task's logits by it.
"""

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

ECE_BINS = 15
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def expected_calibration_error(logits: Tensor, targets: Tensor, bins: int = ECE_BINS) -> float:
    """ECE of softmax(logits) over `bins` equal-width confidence bins."""
    probabilities = logits.float().softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0.0, 1.0, bins + 1)
    # Bin b holds confidences in (edges[b], edges[b + 1]]; a confidence is never 0.
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    gap = torch.zeros(bins).index_add_(0, index, correct - confidence)
    return float(gap.abs().sum() / len(targets))


def fit_temperature(logits: Tensor, targets: Tensor) -> float:
    """The T minimising the NLL of softmax(logits / T) on (logits, targets)."""
    logits = logits.detach().float()
    # Optimised as log T: positive by construction, and the NLL is smoother in it.
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))


@dataclass(frozen=True)
class Calibration:
    temperature: float
    ece_before: float
    """On validation, raw probabilities."""
    ece_after: float
    """On validation, with the temperature fitted on validation itself."""
    ece_after_held_out: float | None
    """Two-fold: T fitted on one half of validation, ECE measured on the other, averaged, so
    not flattered by fitting and measuring on the same images (None below two images)."""
    nll_before: float
    nll_after: float

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def calibrate(logits: Tensor, targets: Tensor) -> Calibration:
    """Fit the temperature on validation logits and measure what it changes."""
    logits, targets = logits.detach().float().cpu(), targets.cpu()
    temperature = fit_temperature(logits, targets)
    # A fixed interleaving: the folds do not depend on any random state.
    folds = [torch.arange(start, len(targets), 2) for start in (0, 1)]
    held_out = []
    for fitted, measured in (folds, folds[::-1]):
        if len(fitted) and len(measured):
            fold_t = fit_temperature(logits[fitted], targets[fitted])
            held_out.append(
                expected_calibration_error(logits[measured] / fold_t, targets[measured])
            )
    nll = torch.nn.functional.cross_entropy
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(logits, targets),
        ece_after=expected_calibration_error(logits / temperature, targets),
        ece_after_held_out=sum(held_out) / len(held_out) if held_out else None,
        nll_before=float(nll(logits, targets)),
        nll_after=float(nll(logits / temperature, targets)),
    )
