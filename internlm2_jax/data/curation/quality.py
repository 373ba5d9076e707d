"""Quality scoring for the curation pipeline (InternLM2 report §3.1.2): a linear classifier on hashed n-grams scores
each document, and the score puts it in a high / moderate / low tier with its own sampling weight.

- Features: lower-cased word, number, punctuation and newline tokens; unigrams and bigrams (`ngram_max`) hashed
  (splitmix64 over CRC-32, stable across processes, unlike Python's salted `hash()`) into `num_features` buckets;
  log-scaled term frequency, L2-normalised; plus three dense document statistics (log length, mean line length,
  fraction of long lines) that n-grams cannot see. Stored sparsely: a document is (indices, values).
- Model: logistic regression, trained in JAX with optax AdamW on minibatches, the sparse dot product written as a
  gather over the weight vector and a `segment_sum`. Scoring is numpy only, so curation workers never import JAX.
- Tiers: `TierConfig` thresholds the score into high (up-sampled), moderate and low (dropped by default).
- Code recipe: `heuristic_code_label` labels the confident ends of a Python corpus from `code_quality_signals`
  (docstrings, line lengths, comments, identifiers), `label_and_train` fits the classifier on those labels, and the
  classifier then scores every file, including the ones the heuristic could not decide.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import math
import re
import tokenize
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
TIERS = ("high", "moderate", "low")
_TOKEN = re.compile(r"[^\W\d]\w*|\d+|[^\w\s]|\n")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_NUM_DENSE = 3


@dataclasses.dataclass(frozen=True)
class HashingConfig:
    """Feature hashing parameters; a saved classifier only makes sense with the exact parameters it was trained on."""

    num_features: int = 2**18
    ngram_max: int = 2
    seed: int = 0
    dense_features: bool = True

    def __post_init__(self):
        if not 2 <= self.num_features <= 2**30:  # bucket indices are int32, with room for the dense features
            raise ValueError(f"HashingConfig.num_features must be in [2, 2**30], got {self.num_features}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"HashingConfig.seed must be in [0, 2**32), got {self.seed}")
        if not 1 <= self.ngram_max <= 3:
            raise ValueError(f"HashingConfig.ngram_max must be 1, 2 or 3, got {self.ngram_max}")

    @property
    def dim(self) -> int:
        """Length of the weight vector: hashed buckets, then the dense features."""
        return self.num_features + (_NUM_DENSE if self.dense_features else 0)


@dataclasses.dataclass(frozen=True)
class SparseVector:
    indices: np.ndarray  # int32, sorted, unique
    values: np.ndarray  # float32


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # CRC-32 alone is linear, so bigram combinations of it collide in structured ways; this finaliser scrambles.
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def featurize(text: str, config: HashingConfig = HashingConfig()) -> SparseVector:
    """The hashed, log-TF, L2-normalised n-gram vector of one document, with the dense features appended."""
    tokens = _TOKEN.findall(text.lower())
    codes = {token: zlib.crc32(token.encode("utf-8")) for token in set(tokens)}
    unigram = np.fromiter((codes[t] for t in tokens), dtype=np.uint64, count=len(tokens))
    seed = np.uint64(config.seed)
    # An n-gram's hash chains its tokens' codes in order, so "a b" and "b a" land in different buckets; each link
    # is salted with n so that n-grams of different lengths are independent hashes.
    hashes, chain = [], unigram ^ seed
    for n in range(1, config.ngram_max + 1):
        if n > 1:
            chain = chain[:-1] ^ unigram[n - 1:]
        chain = _splitmix64(chain ^ np.uint64(n << 40))
        hashes.append(chain)
    buckets = (np.concatenate(hashes) % np.uint64(config.num_features)).astype(np.int32)
    indices, counts = np.unique(buckets, return_counts=True)
    values = 1.0 + np.log(counts.astype(np.float64))
    if values.size:
        values /= np.linalg.norm(values)
    if config.dense_features:
        indices = np.concatenate([indices, np.arange(config.num_features, config.dim, dtype=np.int32)])
        values = np.concatenate([values, _dense_features(text)])
    return SparseVector(indices.astype(np.int32), values.astype(np.float32))


def _dense_features(text: str) -> np.ndarray:
    # Scaled to about [0, 1] so that they train at the same learning rate as the normalised n-gram part.
    lines = [line for line in text.split("\n") if line.strip()] or [""]
    lengths = np.array([len(line) for line in lines], dtype=np.float64)
    return np.array([math.log1p(len(text)) / 16.0, min(lengths.mean() / 100.0, 2.0), float(np.mean(lengths > 100))])


def _pack(vectors: Sequence[SparseVector]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenates documents into flat (indices, values, segment ids), the layout both scorers use."""
    indices = np.concatenate([v.indices for v in vectors]) if vectors else np.zeros(0, np.int32)
    values = np.concatenate([v.values for v in vectors]) if vectors else np.zeros(0, np.float32)
    segments = np.repeat(np.arange(len(vectors), dtype=np.int32), [v.indices.size for v in vectors])
    return indices, values, segments


def _jax_logits(weights, bias, indices, values, segments, num_segments: int):
    """The training-time logits: a gather of the touched weights and a per-document segment sum."""
    import jax

    return jax.ops.segment_sum(weights[indices] * values, segments, num_segments=num_segments) + bias


def _binary_labels(labels: Sequence) -> np.ndarray:
    mapping = {"high": 1.0, "low": 0.0, 1: 1.0, 0: 0.0}  # True/False and numpy integers hash as 1/0 too
    try:
        return np.array([mapping[label] for label in labels], dtype=np.float32)
    except (KeyError, TypeError) as err:
        raise ValueError(f"labels must be 'high'/'low' or 1/0, got {err.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class QualityClassifier:
    features: HashingConfig
    weights: np.ndarray  # float32 [features.dim]
    bias: float

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence, *, features: HashingConfig = HashingConfig(),
            epochs: int = 10, batch_size: int = 32, learning_rate: float = 0.05, weight_decay: float = 1e-4,
            seed: int = 0) -> QualityClassifier:
        """Trains on `labels` ("high"/"low" or 1/0); deterministic for a seed (it fixes the minibatch order)."""
        y = _binary_labels(labels)
        if len(texts) != len(y) or not len(y):
            raise ValueError(f"need as many labels as texts, and at least one: {len(texts)} texts, {len(y)} labels")
        vectors = [featurize(text, features) for text in texts]
        weights, bias = _train(vectors, y, features.dim, epochs=epochs, batch_size=batch_size,
                               learning_rate=learning_rate, weight_decay=weight_decay, seed=seed)
        return cls(features, weights, bias)

    def logits_of(self, vectors: Sequence[SparseVector]) -> np.ndarray:
        indices, values, segments = _pack(vectors)
        sums = np.bincount(segments, weights=self.weights[indices] * values, minlength=len(vectors))
        return (sums + self.bias).astype(np.float32)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return self.logits_of([featurize(text, self.features) for text in texts])

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Probability of "high" quality, float32 in [0, 1]."""
        logits = self.logits(texts).astype(np.float64)
        return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # the sigmoid, without exp overflow

    def save(self, path: str | Path) -> None:
        config = {"format_version": FORMAT_VERSION, "features": dataclasses.asdict(self.features)}
        with open(path, "wb") as f:  # a file object, so np.savez does not append ".npz" to the name
            np.savez(f, weights=self.weights, bias=np.float32(self.bias), config=np.array(json.dumps(config)))

    @classmethod
    def load(cls, path: str | Path, *, features: HashingConfig | None = None) -> QualityClassifier:
        """Loads a saved classifier; with `features`, also checks that it was trained with exactly those."""
        with np.load(path, allow_pickle=False) as data:
            for field in ("config", "weights", "bias"):
                if field not in data.files:
                    raise ValueError(f"{path}: not a quality classifier, missing field {field!r}")
            config, weights, bias = json.loads(str(data["config"])), data["weights"], float(data["bias"])
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version is {config.get('format_version')!r}, this code reads "
                             f"{FORMAT_VERSION}")
        try:
            saved = HashingConfig(**config["features"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: bad features field: {err}") from None
        if features is not None:
            for field in dataclasses.fields(HashingConfig):
                if getattr(saved, field.name) != getattr(features, field.name):
                    raise ValueError(f"{path}: features.{field.name} is {getattr(saved, field.name)!r}, expected "
                                     f"{getattr(features, field.name)!r}")
        if weights.shape != (saved.dim,):
            raise ValueError(f"{path}: weights has shape {weights.shape}, features need ({saved.dim},)")
        return cls(saved, weights.astype(np.float32), bias)


def _train(vectors: Sequence[SparseVector], y: np.ndarray, dim: int, *, epochs: int, batch_size: int,
           learning_rate: float, weight_decay: float, seed: int) -> tuple[np.ndarray, float]:
    import jax
    import jax.numpy as jnp
    import optax

    # No weight decay on the bias: it only absorbs the class balance.
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay, mask={"w": True, "b": False})
    params = {"w": jnp.zeros(dim, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, indices, values, segments, labels, mask):
        def loss_fn(p):
            logits = _jax_logits(p["w"], p["b"], indices, values, segments, labels.shape[0])
            return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels) * mask) / jnp.sum(mask)

        grads = jax.grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(vectors))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            indices, values, segments = _pack([vectors[i] for i in batch])
            # Fixed batch rows and power-of-two entry counts keep the number of compiled shapes small; padding
            # entries have value 0 (no logit, no gradient) and padding rows have mask 0.
            size = max(1024, 1 << int(indices.size - 1).bit_length())
            pad = size - indices.size
            labels, mask = np.zeros(batch_size, np.float32), np.zeros(batch_size, np.float32)
            labels[:batch.size], mask[:batch.size] = y[batch], 1.0
            params, state = step(params, state, np.pad(indices, (0, pad)), np.pad(values, (0, pad)),
                                 np.pad(segments, (0, pad)), labels, mask)
    return np.asarray(params["w"], np.float32), float(params["b"])


def _roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with tied scores counted as half; NaN when one class is missing."""
    positives, negatives = int(labels.sum()), int(labels.size - labels.sum())
    if not positives or not negatives:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(scores.size, np.float64)
    ranks[order] = np.arange(1, scores.size + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]  # average rank within each tie group
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def evaluate_classifier(classifier: QualityClassifier, texts: Sequence[str], labels: Sequence) -> dict[str, float]:
    """Accuracy (threshold 0.5) and ROC AUC of the classifier on a held-out labelled set."""
    y = _binary_labels(labels)
    scores = classifier.score(texts)
    accuracy = float(np.mean((scores >= 0.5) == (y == 1))) if y.size else float("nan")
    return {"n": float(y.size), "accuracy": accuracy, "auc": _roc_auc(scores, y)}


@dataclasses.dataclass(frozen=True)
class TierConfig:
    """Score thresholds for the tiers and the sampling weight of each tier.

    A weight is a relative sampling rate (it can be used as a manifest `epochs`): above 1 up-samples, 0 drops.
    """

    high_threshold: float = 0.7
    low_threshold: float = 0.3
    high_weight: float = 2.0
    moderate_weight: float = 1.0
    low_weight: float = 0.0

    def __post_init__(self):
        for name in ("high_threshold", "low_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TierConfig.{name} must be in [0, 1], got {value}")
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"TierConfig.low_threshold ({self.low_threshold}) must be <= high_threshold "
                             f"({self.high_threshold})")
        for tier in TIERS:
            value = getattr(self, f"{tier}_weight")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TierConfig.{tier}_weight must be a finite number >= 0, got {value}")

    def weight(self, tier: str) -> float:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}, expected one of {TIERS}")
        return getattr(self, f"{tier}_weight")


def assign_tiers(scores: Sequence[float] | np.ndarray, config: TierConfig = TierConfig()) -> list[str]:
    """"high" for a score >= high_threshold, "low" below low_threshold, "moderate" in between."""
    return ["high" if s >= config.high_threshold else "low" if s < config.low_threshold else "moderate"
            for s in np.asarray(scores, dtype=np.float64)]


class _Identifiers(ast.NodeVisitor):
    """Names the file itself chooses: definitions, arguments and assignment targets (not names it only uses)."""

    def __init__(self):
        self.names: set[str] = set()

    def visit_FunctionDef(self, node):
        self.names.add(node.name)
        self.names.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.names.add(node.name)
        self.generic_visit(node)

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Store):
            self.names.add(node.id)


def code_quality_signals(text: str) -> dict[str, float]:
    """Cheap quality signals of one Python file; the syntax-based ones are 0 when it does not parse.

    Line statistics count non-blank lines ("lines", lengths, "long_line_fraction": over 100 characters,
    "comment_ratio": lines with a comment). From the syntax tree: "definitions" (functions and classes),
    "docstring_ratio" of them with a docstring, "module_docstring", "has_tests" (asserts, test functions or
    doctests), and the names the file binds: "mean_identifier_length" and "short_identifier_fraction" (one letter).
    """
    lines = [line for line in text.split("\n") if line.strip()]
    lengths = np.array([len(line) for line in lines] or [0], dtype=np.float64)
    signals = {
        "lines": float(len(lines)),
        "mean_line_length": float(lengths.mean()),
        "max_line_length": float(lengths.max()),
        "long_line_fraction": float(np.mean(lengths > 100)),
        "comment_ratio": _comment_lines(text) / max(len(lines), 1),
        "parses": 0.0, "definitions": 0.0, "docstring_ratio": 0.0, "module_docstring": 0.0, "has_tests": 0.0,
        "mean_identifier_length": 0.0, "short_identifier_fraction": 0.0,
    }
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return signals
    definitions = [node for node in ast.walk(tree)
                   if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    documented = sum(ast.get_docstring(node) is not None for node in definitions)
    module_docstring = ast.get_docstring(tree) is not None
    visitor = _Identifiers()
    visitor.visit(tree)
    names = [name for name in visitor.names if name != "_"]
    has_tests = (any(isinstance(node, ast.Assert) for node in ast.walk(tree))
                 or any(node.name.startswith("test") for node in definitions) or ">>> " in text)
    signals.update({
        "parses": 1.0,
        "definitions": float(len(definitions)),
        # Without definitions the module docstring is the only documentation there is to have.
        "docstring_ratio": documented / len(definitions) if definitions else float(module_docstring),
        "module_docstring": float(module_docstring),
        "has_tests": float(has_tests),
        "mean_identifier_length": float(np.mean([len(n) for n in names])) if names else 0.0,
        "short_identifier_fraction": float(np.mean([len(n) == 1 for n in names])) if names else 0.0,
    })
    return signals


def _comment_lines(text: str) -> int:
    # tokenize, not `line.startswith("#")`, so a "#" inside a string is not a comment; a regex fallback for
    # files tokenize rejects (unterminated strings, bad indentation).
    try:
        return len({tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                    if tok.type == tokenize.COMMENT})
    except (tokenize.TokenError, SyntaxError):
        return sum(line.lstrip().startswith("#") for line in text.split("\n"))


def heuristic_code_label(text: str) -> str | None:
    """"high" or "low" for a Python file that is clearly one or the other, None when the signals disagree.

    Low: does not parse, has many over-long lines, is an undocumented and uncommented pile of definitions, or
    names things with single letters. High: parses, documents most of its definitions and keeps to short lines
    and descriptive names. Only the confident ends are labelled; the classifier trained on them scores the rest.
    """
    s = code_quality_signals(text)
    if s["lines"] < 10:
        return None  # too little code to judge
    if (not s["parses"] or s["long_line_fraction"] > 0.05 or s["max_line_length"] > 200
            or s["short_identifier_fraction"] > 0.35
            or (s["definitions"] >= 3 and s["docstring_ratio"] < 0.3 and s["comment_ratio"] < 0.12)):
        return "low"
    if (s["docstring_ratio"] >= 0.6 and s["module_docstring"] and s["long_line_fraction"] <= 0.01
            and s["max_line_length"] <= 120 and s["short_identifier_fraction"] <= 0.2):
        return "high"
    return None


@dataclasses.dataclass(frozen=True)
class RecipeReport:
    labelled: dict[str, int]  # heuristic label counts over all texts: "high", "low", "unlabelled"
    train: int  # balanced training documents
    heldout: int  # balanced held-out documents
    heldout_accuracy: float  # agreement with the heuristic on held-out documents
    heldout_auc: float


def label_and_train(texts: Sequence[str], *, heldout_fraction: float = 0.25, seed: int = 0,
                    features: HashingConfig = HashingConfig(), **fit_kwargs) -> tuple[QualityClassifier, RecipeReport]:
    """The code-quality recipe: heuristic labels -> balanced train/held-out split -> fit -> evaluate.

    Balancing down-samples the larger class, so the classifier's 0.5 point separates the two kinds of code rather
    than reflecting how common each is; the held-out numbers measure how well the n-gram model reproduces the
    heuristic on files it has not seen.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    labels = [heuristic_code_label(text) for text in texts]
    rng = np.random.default_rng(seed)
    by_class = {c: rng.permutation([i for i, label in enumerate(labels) if label == c]) for c in ("high", "low")}
    per_class = min(len(ids) for ids in by_class.values())
    n_heldout = round(per_class * heldout_fraction)
    if n_heldout < 1 or per_class - n_heldout < 1:
        raise ValueError(f"too few confidently labelled texts to train and evaluate: "
                         f"{len(by_class['high'])} high, {len(by_class['low'])} low")
    heldout = np.concatenate([ids[:n_heldout] for ids in by_class.values()])
    train = np.concatenate([ids[n_heldout:per_class] for ids in by_class.values()])
    classifier = QualityClassifier.fit([texts[i] for i in train], [labels[i] for i in train], features=features,
                                       seed=seed, **fit_kwargs)
    metrics = evaluate_classifier(classifier, [texts[i] for i in heldout], [labels[i] for i in heldout])
    counts = {"high": len(by_class["high"]), "low": len(by_class["low"])}
    counts["unlabelled"] = len(texts) - counts["high"] - counts["low"]
    report = RecipeReport(counts, int(train.size), int(heldout.size), metrics["accuracy"], metrics["auc"])
    return classifier, report
