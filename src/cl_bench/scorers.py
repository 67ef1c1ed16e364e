"""Scorers for instruction tasks: per-example scores in [0, 1] that the runner sums into ``sum[i][j]``.

Every scorer takes ``(predictions, references, prompts)``: generated strings, one tuple of accepted
answers per example (the best-matching reference counts) and the prompts (for scorers that compare
with the source, e.g. SARI). An empty prediction scores 0 and stays in the denominator, as in TRACE's
evaluation scripts.
"""
from __future__ import annotations

import re
import string
from typing import Callable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def _best(predictions: Sequence[str], references: Sequence[Sequence[str]], score: Callable[[str, str], float]):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    return np.array([max((score(p, r) for r in refs), default=0.0) if p.strip() else 0.0
                     for p, refs in zip(predictions, references)], dtype=float)


def exact_match(predictions, references, prompts=None) -> np.ndarray:
    """1 when the normalised prediction equals a normalised reference."""
    return _best(predictions, references, lambda p, r: float(normalize_answer(p) == normalize_answer(r)))


def accuracy(predictions, references, prompts=None) -> np.ndarray:
    """Label accuracy for generated class names or options: the first non-empty line of the
    prediction, normalised, equals a normalised reference (text after the label's line, such as an
    explanation, is ignored)."""
    def first_line(text: str) -> str:
        return next((line for line in str(text).splitlines() if line.strip()), "")
    return _best(predictions, references, lambda p, r: float(normalize_answer(first_line(p)) == normalize_answer(r)))


def answer_recall(predictions, references, prompts=None) -> np.ndarray:
    """The fraction of the reference's normalised words that occur in the normalised prediction:
    short-answer QA for chatty models, which wrap a correct answer in a sentence."""
    def recall(prediction: str, reference: str) -> float:
        wanted = normalize_answer(reference).split()
        said = set(normalize_answer(prediction).split())
        return sum(w in said for w in wanted) / len(wanted) if wanted else 0.0
    return _best(predictions, references, recall)


def rouge_l(predictions, references, prompts=None) -> np.ndarray:
    """ROUGE-L F-measure (Lin 2004) with the ``rouge-score`` package's tokenizer (lower case, alphanumerics)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return _best(predictions, references, lambda p, r: scorer.score(r, p)["rougeL"].fmeasure)


def edit_similarity(predictions, references, prompts=None) -> np.ndarray:
    """Normalised Indel similarity of the raw strings (``rapidfuzz.fuzz.ratio`` / 100), the
    ``fuzz.ratio`` TRACE scores code completion (Py150) with."""
    from rapidfuzz import fuzz

    return _best(predictions, references, lambda p, r: fuzz.ratio(p.strip(), r.strip()) / 100.0)


SCORERS: dict[str, Callable[..., np.ndarray]] = {
    "accuracy": accuracy, "exact_match": exact_match, "answer_recall": answer_recall, "rouge_l": rouge_l, "edit_similarity": edit_similarity,
}


def score(name: str, predictions, references, prompts) -> np.ndarray:
    return SCORERS[name](list(predictions), list(references), list(prompts))
