"""Text metrics for generated answers: exact match, substring match, BLEU and ROUGE-L.

Implemented here (no extra dependency). Texts are compared after ``normalize`` (lower case,
collapsed white space, trailing full stop removed); BLEU and ROUGE-L work on white-space tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter


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
