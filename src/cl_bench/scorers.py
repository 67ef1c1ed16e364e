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


def _same_answer(prediction: str, reference: str) -> float:
    """Equality after ``normalize_answer``; a reference that normalises to nothing (an option
    letter "A", the word "the") is compared as stripped lower-case text instead, so it cannot match
    every other empty normalisation."""
    wanted = normalize_answer(reference)
    if not wanted:
        return float(prediction.strip().lower() == reference.strip().lower())
    return float(normalize_answer(prediction) == wanted)


def exact_match(predictions, references, prompts=None) -> np.ndarray:
    """1 when the normalised prediction equals a normalised reference."""
    return _best(predictions, references, _same_answer)


def accuracy(predictions, references, prompts=None) -> np.ndarray:
    """Label accuracy for generated class names or options: the first non-empty line of the
    prediction, normalised, equals a normalised reference (text after the label's line, such as an
    explanation, is ignored)."""
    def first_line(text: str) -> str:
        return next((line for line in str(text).splitlines() if line.strip()), "")
    return _best(predictions, references, lambda p, r: _same_answer(first_line(p), r))


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


def exact_string(predictions, references, prompts=None) -> np.ndarray:
    """TRACE's accuracy (``caculate_accuracy``): the prediction equals a reference character for
    character, surrounding whitespace aside; no case folding or punctuation removal, so "-3" is not
    "3" and "1.25" is not "12.5" (C-STANCE, FOMC, NumGLUE)."""
    return _best(predictions, references, lambda p, r: float(p.strip() == r.strip()))


def first_character(predictions, references, prompts=None) -> np.ndarray:
    """TRACE's ScienceQA answer accuracy: the first character of the prediction (the option letter of
    "A\\nBecause ...") equals the reference's first character."""
    return _best(predictions, references, lambda p, r: float(bool(r.strip()) and p.strip()[:1] == r.strip()[:1]))


_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def _code_literals(code: str) -> str:
    """CodeXGLUE literal placeholders made plain, as TRACE's Py150 ``postprocess``: <NUM_LIT> -> 0,
    <STR_LIT> and <CHAR_LIT> removed, <STR_LIT:value> -> value."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda match: match.group(2), code)


def code_edit_similarity(predictions, references, prompts=None) -> np.ndarray:
    """``edit_similarity`` after the literal placeholders of both strings are made plain (TRACE, Py150)."""
    from rapidfuzz import fuzz

    return _best(predictions, references,
                 lambda p, r: fuzz.ratio(_code_literals(p).strip(), _code_literals(r).strip()) / 100.0)


def normalize_ni(text: str) -> str:
    """Super-NaturalInstructions' normalisation (SQuAD's without removing articles): lower case, no
    punctuation, single spaces; the ``compute_metrics.py`` of SuperNI, O-LoRA and SAPT."""
    return " ".join(str(text).lower().translate(_PUNCTUATION).split())


def exact_match_ni(predictions, references, prompts=None) -> np.ndarray:
    """Exact match under ``normalize_ni`` (articles kept, so the COPA label "A" is not erased)."""
    return _best(predictions, references, lambda p, r: float(normalize_ni(p) == normalize_ni(r)))


def rouge_l_ni(predictions, references, prompts=None) -> np.ndarray:
    """ROUGE-L F-measure with the Porter stemmer (``RougeScorer(["rougeL"], use_stemmer=True)``), the
    metric of SuperNI's ``compute_metrics.py`` as SAPT and FvForgetting use it."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _best(predictions, references, lambda p, r: scorer.score(r, p)["rougeL"].fmeasure)


_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation except ' - . ,
        (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
        (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless followed by a digit
        (re.compile(r"([0-9])(-)"), r"\1 \2 ")]  # dash after a digit


def _tokenize_13a(text: str) -> str:
    """Lower case and the mteval-v13a tokenisation (sacreBLEU's ``13a``), SARI's preprocessing in EASSE
    and Hugging Face ``evaluate``."""
    text = text.lower().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} "
    for pattern, replacement in _13A:
        text = pattern.sub(replacement, text)
    return " ".join(text.split())


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision > 0 or recall > 0 else 0.0


def _sari_ngram(source: list[str], output: list[str], references: list[list[str]]) -> tuple[float, float, float]:
    """(F_keep, P_del, F_add) of one n-gram order. Counts of source and output are scaled by the number
    of references r instead of dividing reference counts by r; 0/0 counts as 1."""
    from collections import Counter

    r = len(references)
    ref = Counter(g for grams in references for g in grams)
    src = Counter({g: c * r for g, c in Counter(source).items()})
    out = Counter({g: c * r for g, c in Counter(output).items()})
    keep, keep_ref = src & out, src & ref
    keep_good = keep & ref
    keep_p = sum(keep_good[g] / keep[g] for g in keep) / len(keep) if keep else 1.0
    keep_r = sum(keep_good.values()) / sum(keep_ref.values()) if keep_ref else 1.0
    deleted = src - out
    deleted_good = deleted - ref
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0
    added = set(out) - set(src)
    added_good, wanted = added & set(ref), set(ref) - set(src)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(wanted) if wanted else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari_sentence(source: str, output: str, references: Sequence[str]) -> float:
    """SARI (Xu et al., TACL 2016) of one output in [0, 1]: the mean over n = 1..4 of the n-gram
    scores, then (F_keep + P_del + F_add) / 3."""
    tokens = [_tokenize_13a(text).split(" ") for text in (source, output, *references)]
    scores = [_sari_ngram(_ngrams(tokens[0], n), _ngrams(tokens[1], n), [_ngrams(t, n) for t in tokens[2:]])
              for n in (1, 2, 3, 4)]
    return sum(sum(s[k] for s in scores) / 4 for k in range(3)) / 3


def sari(predictions, references, prompts=None) -> np.ndarray:
    """SARI against all of an example's references, with the prompt as the source sentence; TRACE
    scores 20Minuten this way (its eval passes the whole prompt as ``sources`` to ``sari``).

    Follows the authors' reference implementation as Hugging Face ``evaluate``/EASSE compute it (what
    TRACE calls): per-n-gram keep precision averaged over kept n-grams, keep recall over the
    reference-kept counts, add scored on n-gram sets, F per order then averaged over n = 1..4. The
    paper's equations average precision and recall over the orders before taking F; that variant is
    not offered."""
    if prompts is None or len(prompts) != len(predictions):
        raise ValueError("sari needs the prompts (its source sentences), one per prediction")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    return np.array([sari_sentence(s, p, list(refs)) if p.strip() and refs else 0.0
                     for s, p, refs in zip(prompts, predictions, references)], dtype=float)


SCORERS: dict[str, Callable[..., np.ndarray]] = {
    "accuracy": accuracy, "exact_match": exact_match, "answer_recall": answer_recall, "rouge_l": rouge_l, "edit_similarity": edit_similarity,
    # the published instruction benchmarks (TRACE, O-LoRA/SAPT, SuperNI)
    "exact_string": exact_string, "first_character": first_character,
    "code_edit_similarity": code_edit_similarity, "exact_match_ni": exact_match_ni, "rouge_l_ni": rouge_l_ni,
    "sari": sari,
}


def score(name: str, predictions, references, prompts) -> np.ndarray:
    return SCORERS[name](list(predictions), list(references), list(prompts))
