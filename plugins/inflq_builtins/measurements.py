"""The built-in measurements: what a query measures (``inflq query add --measurement NAME``).

A measurement is a weighted sum of token log-probabilities over one or more token sequences; the
shared gradient engine takes the gradient of that sum, so every estimator scores it unchanged.

- ``logprob`` (the default): ``log p(completion | prompt)``, the completion's tokens with weight 1.
- ``mean-logprob``: the same divided by the completion's token count: a per-token log-probability,
  comparable across completions of different lengths.
- ``margin``: ``log p(completion | prompt) − log p(alternative | prompt)``, weight +1 on the
  completion's tokens and −1 on the alternative's: "why does the model prefer A over B". A positive
  score means the training sequence widens the margin (makes the completion more likely than the
  alternative).
"""

from __future__ import annotations

from inflq import Measurement, MeasurementTerm, hookimpl


@hookimpl
def register_measurements(register):
    register(LogProb)
    register(MeanLogProb)
    register(Margin)


class LogProb(Measurement):
    name = "logprob"
    description = "log p(completion | prompt): the completion's summed log-likelihood"
    default = True

    def terms(self, completion, alternative):
        return [MeasurementTerm.of(completion, 1.0)]

    def formula(self) -> str:
        return "log p(completion)"


class MeanLogProb(Measurement):
    name = "mean-logprob"
    description = "log p(completion | prompt) per completion token (the mean over its tokens)"

    def terms(self, completion, alternative):
        n = len(completion.tokens) - completion.completion_start
        return [MeasurementTerm.of(completion, 1.0 / n)]

    def formula(self) -> str:
        return "log p(completion) / tokens"


class Margin(Measurement):
    name = "margin"
    description = "log p(completion) - log p(alternative): why the model prefers the completion over the alternative"
    alternative = True

    def terms(self, completion, alternative):
        return [MeasurementTerm.of(completion, 1.0), MeasurementTerm.of(alternative, -1.0)]

    def formula(self) -> str:
        return "log p(completion) - log p(alternative)"
