"""Answer metrics shared by the benchmarks, written from their published definitions (no extra dependencies).

Every function scores one prediction against its references and returns a number in [0, 1];
:func:`aggregate` turns per-prediction scores into the ``{task: score, ..., "average": score}`` mapping of the
benchmark contract, on a 0–100 scale.

* :func:`string_match_all` / :func:`string_match_part` — RULER (Hsieh et al., arXiv 2404.06654): the fraction of
  references found in the prediction (case-insensitive substring), or whether any is found. The prediction is first
  post-processed as RULER's evaluator does: every ASCII control character (``\x00``–``\x1f``, tab and newline
  included) becomes a newline, so a control character inside a number breaks the match instead of joining its
  halves.
* :func:`qa_f1` — SQuAD token F1 (Rajpurkar et al., arXiv 1606.05250) after the SQuAD answer normalisation
  (lower case, no punctuation, no articles, single spaces), as LongBench and ZeroSCROLLS use it; Chinese text
  counts one token per character without Chinese punctuation (LongBench's ``qa_f1_zh``, per character for jieba).
* :func:`rouge_n`, :func:`rouge_l` — ROUGE F-measures (Lin 2004): n-gram overlap, and the longest common
  subsequence of tokens.
* :func:`edit_similarity` — character similarity ``2·LCS / (|a| + |b|)``, i.e. one minus the insertion/deletion
  edit distance over the total length (the ratio LongBench's code tasks report through ``fuzzywuzzy``).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
#: RULER's post-processing turns these (ASCII 0–31) into newlines before matching; DEL (127) is left alone.
_CONTROL = re.compile(r"[\x00-\x1f]")
#: The Chinese punctuation LongBench's ``qa_f1_zh`` removes (with the ASCII punctuation) before counting tokens.
_ZH_PUNCT = frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏"
)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(text: str) -> list[str]:
    """Tokens for English F1 / ROUGE: the normalised text split at white space (as LongBench's and InfiniteBench's
    English scorers split it; a Chinese character inside an English answer stays part of its word)."""
    return normalize_answer(text).split()


def zh_tokens(text: str) -> list[str]:
    """Tokens for Chinese F1, as LongBench's and InfiniteBench's ``qa_f1_zh`` make them: lower case, Chinese and
    English punctuation and all white space dropped, then every character one token."""
    return [ch for ch in text.lower() if ch not in _PUNCT and ch not in _ZH_PUNCT and not ch.isspace()]


def _ruler_prediction(prediction: str) -> str:
    """The prediction as RULER's evaluator scores it: control characters replaced by newlines, outer whitespace
    stripped, lower-cased (matching is case-insensitive)."""
    return _CONTROL.sub("\n", prediction).strip().lower()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER ``string_match_all``: fraction of ``references`` occurring in ``prediction`` (case-insensitive)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = _ruler_prediction(prediction)
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER ``string_match_part``: 1 if any reference occurs in ``prediction`` (case-insensitive), else 0."""
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    pred = _ruler_prediction(prediction)
    return float(any(ref.lower() in pred for ref in references))


def _f_measure(matched: int, n_pred: int, n_ref: int) -> float:
    """Harmonic mean of precision ``matched / n_pred`` and recall ``matched / n_ref`` (0 when nothing matches)."""
    if matched == 0:
        return 0.0
    precision, recall = matched / n_pred, matched / n_ref
    return 2 * precision * recall / (precision + recall)


def _f1(pred: Sequence[str], ref: Sequence[str]) -> float:
    return _f_measure(sum((Counter(pred) & Counter(ref)).values()), len(pred), len(ref))


def qa_f1(prediction: str, references: Sequence[str]) -> float:
    """Token F1 between the normalised prediction and each reference (English words, :func:`tokens`); the maximum
    over references."""
    if not references:
        raise ValueError("qa_f1 needs at least one reference")
    pred = tokens(prediction)
    return max(_f1(pred, tokens(ref)) for ref in references)


def qa_f1_zh(prediction: str, references: Sequence[str]) -> float:
    """Character F1 for Chinese answers (:func:`zh_tokens`, LongBench's and InfiniteBench's ``qa_f1_zh``); the
    maximum over references. Chosen per task, not by looking at the text."""
    if not references:
        raise ValueError("qa_f1_zh needs at least one reference")
    pred = zh_tokens(prediction)
    return max(_f1(pred, zh_tokens(ref)) for ref in references)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1 if the normalised prediction equals a normalised reference, else 0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def _ngrams(toks: Sequence[str], n: int) -> Counter:
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def rouge_n(prediction: str, reference: str, n: int = 1) -> float:
    """ROUGE-N F-measure: clipped n-gram overlap, harmonic mean of precision and recall."""
    if n < 1:
        raise ValueError(f"rouge_n needs n >= 1, got {n}")
    pred, ref = _ngrams(tokens(prediction), n), _ngrams(tokens(reference), n)
    return _f_measure(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(|a|·|b|) time, O(|b|) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_row = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = prev_row
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: LCS of the token sequences over prediction length (precision) and reference length."""
    pred, ref = tokens(prediction), tokens(reference)
    return _f_measure(lcs_length(pred, ref), len(pred), len(ref))


def max_rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure, maximum over references."""
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    return max(rouge_l(prediction, ref) for ref in references)


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """The words of one longest common subsequence of ``x`` and ``y``, traced back from the end of both: a match
    is taken, otherwise the step goes to ``x``'s shorter prefix only when that keeps a strictly longer LCS. The
    set depends on which LCS is traced; this is the trace of the ROUGE package LongBench scores with."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, a in enumerate(x, 1):
        for j, b in enumerate(y, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a == b else max(table[i - 1][j], table[i][j - 1])
    words: set[str] = set()
    i, j = len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _rouge_sentences(text: str, chinese: bool = False) -> list[list[str]]:
    """Sentences (pieces between periods, empty pieces dropped) as lists of space-separated words, whitespace runs
    collapsed; for a Chinese task, CJK characters are spaced out first, one token each (LongBench segments
    Chinese with jieba, which is not a dependency here: per character is the approximation)."""
    if chinese and _CJK.search(text):
        text = _CJK.sub(lambda m: f" {m.group(0)} ", text)
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _rouge_package_l(prediction: str, reference: str, chinese: bool = False) -> tuple[float, float]:
    """(precision, recall) of the ``rouge`` package's summary-level ROUGE-L (see :func:`longbench_rouge_l`)."""
    pred, ref = _rouge_sentences(prediction, chinese), _rouge_sentences(reference, chinese)
    if not pred or not ref:
        return 0.0, 0.0
    pooled: set[str] = set()
    for ref_sentence in ref:
        for pred_sentence in pred:
            pooled |= _lcs_words(ref_sentence, pred_sentence)
    n_ref = len({w for sentence in ref for w in sentence})
    n_pred = len({w for sentence in pred for w in sentence})
    return len(pooled) / n_pred, len(pooled) / n_ref


def _rouge_score_tokens(text: str) -> list[str]:
    """Tokens as Google's ``rouge_score`` makes them (no stemmer): lower case, every character other than a-z and
    0-9 a separator."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs_indices(ref: Sequence[str], can: Sequence[str]) -> list[int]:
    """Indices into ``ref`` of one longest common subsequence with ``can``, traced back from the end: a match is
    taken; otherwise the step drops the last token of ``can`` when that keeps a strictly longer LCS, else the last
    of ``ref`` (the trace ``rouge_score`` uses, which decides the union below)."""
    table = [[0] * (len(can) + 1) for _ in range(len(ref) + 1)]
    for i, a in enumerate(ref, 1):
        for j, b in enumerate(can, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a == b else max(table[i - 1][j], table[i][j - 1])
    i, j, found = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            found.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return found[::-1]


def rouge_lsum(prediction: str, reference: str) -> float:
    """ROUGE-Lsum F as ``rouge_score`` computes it (InfiniteBench's longbook_sum_eng, through ``evaluate``'s
    ``rouge``): sentences are the non-empty lines; for each reference line, the union of its LCS tokens with every
    prediction line; a token of that union counts once per occurrence still unclaimed in both texts. Precision and
    recall divide the count by the prediction's and the reference's token totals."""
    ref_lines = [_rouge_score_tokens(line) for line in reference.split("\n") if line]
    pred_lines = [_rouge_score_tokens(line) for line in prediction.split("\n") if line]
    m, n = sum(map(len, ref_lines)), sum(map(len, pred_lines))
    if not m or not n:
        return 0.0
    left_ref = Counter(t for line in ref_lines for t in line)
    left_pred = Counter(t for line in pred_lines for t in line)
    hits = 0
    for ref_line in ref_lines:
        union = sorted({i for pred_line in pred_lines for i in _lcs_indices(ref_line, pred_line)})
        for token in (ref_line[i] for i in union):
            if left_ref[token] > 0 and left_pred[token] > 0:
                hits += 1
                left_ref[token] -= 1
                left_pred[token] -= 1
    return _f_measure(hits, n, m)


def max_rouge_lsum(prediction: str, references: Sequence[str]) -> float:
    """:func:`rouge_lsum`, maximum over references (``rouge_score``'s ``score_multi``)."""
    if not references:
        raise ValueError("rouge_lsum needs at least one reference")
    return max(rouge_lsum(prediction, ref) for ref in references)


def loogle_rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L as LooGLE's automatic evaluation reports it: the ``rouge`` package's summary-level ROUGE-L
    *recall* (its ``get_rouge_score`` returns ``"r"`` by default) on the raw texts; an empty prediction is scored
    as the word ``None``, as its script does."""
    return _rouge_package_l(prediction or "None", reference)[1]


def max_loogle_rouge_l(prediction: str, references: Sequence[str]) -> float:
    """:func:`loogle_rouge_l`, maximum over references."""
    if not references:
        raise ValueError("loogle_rouge_l needs at least one reference")
    return max(loogle_rouge_l(prediction, ref) for ref in references)


def longbench_rouge_l(prediction: str, reference: str, chinese: bool = False) -> float:
    """ROUGE-L F as LongBench scores summaries (the ``rouge`` package's summary-level ROUGE-L on the raw text).

    Unlike :func:`rouge_l`, nothing is normalised: case and punctuation stay part of the words. Both texts are
    split into sentences at periods; for each reference sentence, the words of its LCS with every prediction
    sentence are pooled, and the count is the number of distinct words pooled over all reference sentences.
    Precision and recall divide it by the numbers of distinct words of the prediction and of the reference;
    F = 2PR / (P + R + 1e-8). A text with no sentence (empty, or periods only) scores 0, as LongBench's scorer
    catches the package's error for it.
    """
    precision, recall = _rouge_package_l(prediction, reference, chinese)
    if not precision and not recall:
        return 0.0
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def max_longbench_rouge_l(prediction: str, references: Sequence[str], chinese: bool = False) -> float:
    """:func:`longbench_rouge_l`, maximum over references (LongBench keeps the best ground truth)."""
    if not references:
        raise ValueError("longbench_rouge_l needs at least one reference")
    return max(longbench_rouge_l(prediction, ref, chinese) for ref in references)


def max_longbench_rouge_l_zh(prediction: str, references: Sequence[str]) -> float:
    """:func:`max_longbench_rouge_l` for LongBench's Chinese tasks (``rouge_zh``: Chinese segmented first)."""
    return max_longbench_rouge_l(prediction, references, chinese=True)


def rouge_geometric_mean(prediction: str, references: Sequence[str]) -> float:
    """Geometric mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measures (ZeroSCROLLS' summarisation score), max over
    references."""
    if not references:
        raise ValueError("rouge_geometric_mean needs at least one reference")
    best = 0.0
    for ref in references:
        parts = (rouge_n(prediction, ref, 1), rouge_n(prediction, ref, 2), rouge_l(prediction, ref))
        best = max(best, math.prod(parts) ** (1 / 3))
    return best


def edit_similarity(prediction: str, reference: str) -> float:
    """``2·LCS(a, b) / (|a| + |b|)`` over characters: 1 for equal strings, 0 for strings sharing no character."""
    total = len(prediction) + len(reference)
    if total == 0:
        return 1.0
    return 2 * lcs_length(prediction, reference) / total


def aggregate(scores: Iterable[tuple[str, float] | tuple[str, float, float]]) -> dict[str, float]:
    """``{task: 100·mean score, ..., "average": mean of the task scores}``, each rounded to 2 decimals (as RULER).

    ``scores`` yields ``(task, score in [0, 1])`` pairs, or ``(task, score, weight)`` for a task whose score
    pools units of different sizes (a weighted mean). Tasks appear in first-seen order; no pairs gives ``{}``.
    """
    per_task: dict[str, list[tuple[float, float]]] = {}
    for task, value, *weight in scores:
        per_task.setdefault(task, []).append((float(value), float(weight[0]) if weight else 1.0))
    result = {task: round(100 * sum(v * w for v, w in vw) / sum(w for _, w in vw), 2) for task, vw in per_task.items()}
    if result:
        result["average"] = round(sum(result.values()) / len(result), 2)
    return result


def score_predictions(predictions, metric_of: Callable[[str], Callable[[str, Sequence[str]], float]]):
    """Aggregate ``metric_of(task)(prediction, answers)`` over ``predictions`` (see :func:`aggregate`)."""
    from kvsqueeze.evaluation.base import Prediction

    pairs = []
    for p in predictions:
        if not isinstance(p, Prediction):
            raise TypeError(f"score() expects Prediction rows, got {type(p).__name__}")
        pairs.append((p.task, metric_of(p.task)(p.prediction, p.answers)))
    return aggregate(pairs)
