"""Text metrics for generated answers (exact match, substring match, BLEU, ROUGE-L) and the 95% intervals of
their means.

Implemented here (numpy only). Texts are compared after ``normalize`` (lower case, collapsed white space,
trailing full stop removed); BLEU and ROUGE-L work on white-space tokens. A mean of 0/1 scores gets a Wilson
score interval, any other mean a percentile bootstrap with a fixed seed: a difference between two methods
inside their intervals is a tie, so every summary carries one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().strip(".").split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def substring_match(prediction: str, reference: str) -> float:
    """1.0 when the (normalized) reference occurs inside the (normalized) prediction as whole words: "58213"
    is found in "the pass key is 58213, remember it" but not in "582130" (a wrong, longer number)."""
    ref = normalize(reference)
    return float(bool(ref) and re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", normalize(prediction)) is not None)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(prediction: str, reference: str, max_n: int = 4, smooth: bool = True) -> float:
    """Sentence BLEU (Papineni et al. 2002) with uniform weights up to ``max_n``-grams and the
    brevity penalty; ``smooth`` adds one to the counts of n > 1 (Lin & Och 2004, "+1" smoothing)
    so that a short correct answer does not score 0. Returns a value in [0, 1]."""
    hyp, ref = normalize(prediction).split(), normalize(reference).split()
    if not hyp or not ref:
        return float(hyp == ref)
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp_grams, ref_grams = _ngrams(hyp, n), _ngrams(ref, n)
        overlap = sum(min(c, ref_grams[g]) for g, c in hyp_grams.items())
        total = max(0, len(hyp) - n + 1)
        add = 1.0 if smooth and n > 1 else 0.0
        if overlap + add == 0 or total + add == 0:
            return 0.0
        log_precision += math.log((overlap + add) / (total + add)) / max_n
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision)


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): longest common subsequence of tokens, harmonic mean of P and R."""
    hyp, ref = normalize(prediction).split(), normalize(reference).split()
    if not hyp or not ref:
        return float(hyp == ref)
    lcs = _lcs(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_metrics(prediction: str, reference: str) -> dict[str, float]:
    return {"exact_match": exact_match(prediction, reference),
            "substring_match": substring_match(prediction, reference),
            "bleu": bleu(prediction, reference), "rouge_l": rouge_l(prediction, reference)}


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) of a proportion ``successes / n``: unlike the normal approximation it
    stays inside [0, 1] and is not empty at 0/n or n/n, the usual case of a small model on a hard task.
    ``n == 0`` has no proportion: ``(nan, nan)``, so that an empty configuration reads ``-``."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``: ``resamples`` resamples with replacement drawn
    from a generator seeded with ``seed``, so the same values always give the same interval (a report can be
    regenerated and diffed). No values: ``(nan, nan)``."""
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and resamples >= 1, got {confidence}, {resamples}")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, data.size, size=(resamples, data.size))
    means = data[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def ratio_of_means_interval(numerators: Sequence[float], denominators: Sequence[float], confidence: float = 0.95,
                            resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Paired percentile bootstrap interval of ``mean(numerators) / mean(denominators)``, the two measured on the same
    samples (e.g. one method's perplexities over the full context's): each resample draws sample indices, so a
    hard sample weighs on both means at once and the interval is narrower than two separate ones would suggest."""
    top, bottom = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if top.shape != bottom.shape:
        raise ValueError(f"paired values need equal lengths, got {top.size} and {bottom.size}")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and resamples >= 1, got {confidence}, {resamples}")
    if top.size == 0:
        return float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, top.size, size=(resamples, top.size))
    ratios = top[picks].mean(axis=1) / bottom[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float], binary: bool, z: float = 1.96) -> tuple[float, float]:
    """The 95% interval of the mean of one metric over samples: Wilson for a ``binary`` metric (accuracy,
    exact or substring match) whose values are all 0 or 1, the bootstrap otherwise: a continuous metric (BLEU,
    ROUGE-L, log-probabilities, perplexities; all zeros too) or the shared-context mode's per-sample fraction
    of questions right, whose questions are not independent."""
    if binary and all(v in (0.0, 1.0) for v in values):
        return wilson_interval(sum(values), len(values), z)
    return bootstrap_interval(values)
