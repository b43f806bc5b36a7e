"""The blind baseline: can members be told from non-members by the text alone, without the model?

Das, Zhang and Tramèr 2024 ("Blind Baselines Beat Membership Inference Attacks for Foundation
Models") showed that on most published member/non-member splits a classifier that never looks at
the model — bag-of-words, dates, a few rare n-grams — beats the membership-inference attacks:
the non-members were collected later or elsewhere, so the split itself is separable (a
*distribution shift*), and an MIA's AUC on it says little about the model.

memscan runs one such classifier on every ``lm mia`` split: character n-grams (2–5, within word
boundaries) and word uni- and bigrams (hashed into 2^18 columns each), TF-IDF with sublinear term
frequency, into an L2
logistic regression (C = 1), evaluated by stratified K-fold cross-validation (K = 5, shuffled
with the run's seed, fewer folds when a class is smaller). Every text is scored by the model of
the fold that did not train on it (out-of-fold decision values; the vectorizer is fitted inside
each fold, so nothing leaks); higher = "looks like a member". Their ROC AUC is
:func:`memscan.mia.metrics.roc_metrics`'s, as for every score.

An AUC ≥ :data:`BLIND_AUC_WARNING` (0.6) means the split is separable without the model: the MIA
numbers on it mean little (the report says so in a warning box).

Examples
--------
>>> texts = [f"member {i} says alpha" for i in range(20)] + [f"other {i} says beta" for i in range(20)]
>>> res = blind_baseline(texts, [True] * 20 + [False] * 20, seed=0)
>>> round(res.roc.auc, 6), res.warning
(1.0, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from memscan.errors import InputError
from memscan.generators.seeds import numpy_seed
from memscan.mia.metrics import RocResult, as_labels, check_two_classes, roc_metrics

__all__ = ["BLIND_AUC_WARNING", "BLIND_WARNING_TEXT", "BlindBaseline", "blind_baseline", "blind_classifier"]

#: AUC of the blind baseline from which the report warns that the split is biased.
BLIND_AUC_WARNING = 0.6

BLIND_WARNING_TEXT = (
    "the member/non-member split is separable without the model: the MIA numbers mean little (Das et al. 2024)"
)

#: Hashed feature columns per n-gram family (collisions are rare at this size; memory stays bounded).
HASH_FEATURES = 2**18

#: Folds of the cross-validation (fewer when a class has fewer examples).
DEFAULT_FOLDS = 5


@dataclass(frozen=True, eq=False)
class BlindBaseline:
    """The blind baseline on one split.

    Attributes
    ----------
    scores : out-of-fold decision values, one per text (higher = predicted member); ``None``
        when it could not run
    roc : their :class:`RocResult` (``None`` when it could not run)
    folds : folds of the cross-validation
    warning : ``roc.auc ≥`` :data:`BLIND_AUC_WARNING`
    skipped : why it could not run (a class with fewer than 2 texts), else ``None``
    params : the classifier's settings, for the manifest
    """

    scores: np.ndarray | None
    roc: RocResult | None
    folds: int
    warning: bool
    skipped: str | None = None
    params: dict = field(default_factory=dict)

    @property
    def auc(self) -> float | None:
        return None if self.roc is None else self.roc.auc


def blind_classifier(seed: int = 0):
    """The scikit-learn pipeline: TF-IDF of character 2–5-grams and word 1–2-grams → logistic
    regression."""
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, make_pipeline

    def tfidf(**kw):
        # hashed n-gram counts (bounded memory on any corpus), then TF-IDF with sublinear tf
        hashed = HashingVectorizer(n_features=HASH_FEATURES, alternate_sign=False, norm=None, **kw)
        return make_pipeline(hashed, TfidfTransformer(sublinear_tf=True))

    features = FeatureUnion(
        [
            ("chars", tfidf(analyzer="char_wb", ngram_range=(2, 5))),
            ("words", tfidf(analyzer="word", ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b")),
        ]
    )
    return make_pipeline(
        features, LogisticRegression(C=1.0, solver="liblinear", max_iter=2000, random_state=numpy_seed(seed) % 2**32)
    )


def blind_baseline(texts, is_member, *, folds: int = DEFAULT_FOLDS, seed: int = 0, bootstrap: int = 0) -> BlindBaseline:
    """Cross-validated out-of-fold scores of :func:`blind_classifier` on the texts, and their ROC.

    Parameters
    ----------
    texts : the member and non-member texts
    is_member : one flag per text
    folds : K of the stratified K-fold (at most the size of the smaller class)
    seed : shuffles the folds; seeds the bootstrap
    bootstrap : replicates for the 95 % intervals of :func:`roc_metrics`
    """
    from sklearn.model_selection import StratifiedKFold

    texts = [str(t) for t in texts]
    y = as_labels(is_member, len(texts))
    check_two_classes(y)
    if int(folds) < 2:
        raise InputError(f"folds={folds}", "use at least 2 folds")
    smaller = int(min(y.sum(), (~y).sum()))
    k = min(int(folds), smaller)
    params = {
        "features": "tf-idf of hashed (2^18) char_wb 2-5-grams + word 1-2-grams, sublinear tf",
        "classifier": "logistic regression, L2, C=1",
        "cv": f"stratified {k}-fold, shuffled, seed {seed}",
        "folds": k,
        "seed": int(seed),
    }
    if k < 2:
        reason = f"the smaller class has {smaller} text(s); cross-validation needs at least 2 of each"
        return BlindBaseline(None, None, k, False, reason, params)
    scores = np.empty(len(texts), dtype=np.float64)
    arr = np.array(texts, dtype=object)
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=numpy_seed(seed) % 2**32).split(arr, y):
        clf = blind_classifier(seed).fit(arr[train].tolist(), y[train])
        scores[test] = clf.decision_function(arr[test].tolist())
    roc = roc_metrics(scores, y, bootstrap=bootstrap, seed=seed)
    return BlindBaseline(scores, roc, k, bool(roc.auc >= BLIND_AUC_WARNING), None, params)
