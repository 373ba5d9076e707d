"""Quality scoring: hashed n-gram features, the JAX-trained logistic classifier and its numpy scorer, tiers, and the
code-quality heuristic recipe on the stdlib corpus."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax.data.corpus import stdlib_corpus
from internlm2_jax.data.curation.quality import (
    HashingConfig,
    QualityClassifier,
    TierConfig,
    _jax_logits,
    _pack,
    _roc_auc,
    assign_tiers,
    code_quality_signals,
    evaluate_classifier,
    featurize,
    heuristic_code_label,
    label_and_train,
)

GOOD_MODULE = '''"""Parsing and writing of simple INI-style configuration files.

Sections keep the order in which they first appear, and a malformed line is reported with its
line number so that the user can find it.
"""

import re

_SECTION = re.compile(r"^\\[(?P<name>[^\\]]+)\\]$")
_ASSIGNMENT = re.compile(r"^(?P<key>[\\w.-]+)\\s*=\\s*(?P<value>.*)$")


class ParseError(ValueError):
    """Raised for a line that is neither a section header, an assignment nor a comment."""

    def __init__(self, lineno, line):
        """Remembers where parsing failed, so that the message can point at it."""
        super().__init__(f"line {lineno}: cannot parse {line!r}")
        self.lineno = lineno


def parse(text):
    """Returns a dict mapping each section name to a dict of its keys and values.

    >>> parse("[server]\\\\nport = 8080")
    {'server': {'port': '8080'}}
    """
    sections = {}
    current = None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        header = _SECTION.match(line)
        if header:
            current = sections.setdefault(header.group("name"), {})
            continue
        assignment = _ASSIGNMENT.match(line)
        if assignment is None or current is None:
            raise ParseError(lineno, line)
        current[assignment.group("key")] = assignment.group("value")
    return sections


def dump(sections):
    """Returns the text that `parse` turns back into `sections`."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    return "\\n".join(lines)
'''

BAD_BLOB = '''import os,sys,re
def f(a,b,c):
    x=[]
    for i in os.listdir(a):
        if i in b and len(i)>c and not i.startswith('_') and i.endswith(('.py','.txt','.cfg')) and os.path.exists(a+i): x.append(a+i)
    return x
def g(p,q):
    r={}
    for l in open(p).read().split('\\n'):
        m=re.match('^([a-z]+)=(.*)$',l)
        if m and m.group(1) not in q and m.group(2).strip()!='' and not m.group(2).startswith('#'): r[m.group(1)]=m.group(2)
    return r
def h(d):
    s=''
    for k in d:
        s=s+k+'='+str(d[k])+'\\n'
    return s
def m(a):
    t=g(a,[])
    for k,v in t.items():
        if v.isdigit(): t[k]=int(v)
        elif v in ('yes','no','true','false','on','off'): t[k]=v in ('yes','true','on')
        else: t[k]=v
    return t
def n(a,b):
    for i in f(a,b,3):
        sys.stdout.write(h(m(i)))
'''  # noqa: E501 (over-long lines are what makes it bad)


def _synthetic(rng, n, vocab_a, vocab_b, shared, words=30, separable=True):
    """Documents with a third of their words from their class's vocabulary (or random labels over one vocab)."""
    labels = rng.integers(0, 2, size=n)
    texts = []
    for label in labels:
        own = (vocab_a if label else vocab_b) if separable else shared
        texts.append(" ".join(list(rng.choice(own, words // 3)) + list(rng.choice(shared, words - words // 3))))
    return texts, labels


@pytest.fixture(scope="module")
def separable():
    rng = np.random.default_rng(0)
    vocab_a = [f"alpha{i}" for i in range(100)]
    vocab_b = [f"beta{i}" for i in range(100)]
    shared = [f"common{i}" for i in range(300)]
    train = _synthetic(rng, 400, vocab_a, vocab_b, shared)
    heldout = _synthetic(rng, 200, vocab_a, vocab_b, shared)
    return QualityClassifier.fit(*train, epochs=5, seed=0), train, heldout


def test_features_are_sparse_normalised_and_stable():
    config = HashingConfig()
    v = featurize("def f(x):\n    return x + 1\n", config)
    assert v.indices.dtype == np.int32 and v.values.dtype == np.float32
    assert np.all(np.diff(v.indices) > 0) and v.indices[-1] == config.dim - 1
    hashed = v.indices < config.num_features
    assert np.linalg.norm(v.values[hashed]) == pytest.approx(1.0, rel=1e-6)
    # Word order matters (bigrams), and an empty document is the dense part alone.
    assert not np.array_equal(featurize("a b", config).indices, featurize("b a", config).indices)
    assert featurize("", config).indices.tolist() == [config.num_features + k for k in range(3)]
    # The hash is not Python's salted hash(): another interpreter with another PYTHONHASHSEED agrees.
    code = ("from internlm2_jax.data.curation.quality import featurize; "
            "print(featurize('def f(x):\\n    return x + 1\\n').indices.tolist())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(v.indices.tolist())


def test_learns_a_separable_task(separable):
    classifier, _, (texts, labels) = separable
    metrics = evaluate_classifier(classifier, texts, labels)
    assert metrics["accuracy"] > 0.95 and metrics["auc"] > 0.98
    scores = classifier.score(texts)
    assert scores.dtype == np.float32 and np.all((scores >= 0) & (scores <= 1))


def test_cannot_learn_random_labels():
    rng = np.random.default_rng(1)
    shared = [f"word{i}" for i in range(500)]
    train = _synthetic(rng, 400, None, None, shared, separable=False)
    texts, labels = _synthetic(rng, 300, None, None, shared, separable=False)
    classifier = QualityClassifier.fit(*train, epochs=5, seed=0)
    assert evaluate_classifier(classifier, *train)["accuracy"] > 0.9  # it can memorise...
    assert evaluate_classifier(classifier, texts, labels)["accuracy"] < 0.7  # ...but there is nothing to learn


def test_numpy_scores_match_the_training_logits(separable):
    classifier, _, (texts, _) = separable
    vectors = [featurize(text, classifier.features) for text in texts[:50]]
    indices, values, segments = _pack(vectors)
    logits = jax.jit(_jax_logits, static_argnums=5)(jnp.asarray(classifier.weights), classifier.bias, indices,
                                                    values, segments, len(vectors))
    np.testing.assert_allclose(classifier.logits(texts[:50]), np.asarray(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(classifier.score(texts[:50]), 1 / (1 + np.exp(-np.asarray(logits, np.float64))),
                               rtol=1e-5, atol=1e-6)


def test_training_is_deterministic_for_a_seed(separable):
    classifier, (texts, labels), _ = separable
    again = QualityClassifier.fit(texts, [("high" if y else "low") for y in labels], epochs=5, seed=0)
    np.testing.assert_array_equal(classifier.weights, again.weights)
    assert classifier.bias == again.bias
    with pytest.raises(ValueError, match="labels must be"):
        QualityClassifier.fit(texts[:2], ["high", "moderate"])


def test_save_load_roundtrip_and_errors(separable, tmp_path):
    classifier, _, (texts, _) = separable
    path = tmp_path / "quality.npz"
    classifier.save(path)
    loaded = QualityClassifier.load(path, features=HashingConfig())
    np.testing.assert_array_equal(loaded.score(texts), classifier.score(texts))
    assert loaded.features == classifier.features
    with pytest.raises(ValueError, match=r"quality\.npz: features\.num_features is 262144, expected 1024"):
        QualityClassifier.load(path, features=HashingConfig(num_features=1024))
    with pytest.raises(ValueError, match=r"features\.ngram_max"):
        QualityClassifier.load(path, features=HashingConfig(ngram_max=1))
    with np.load(path) as data:
        fields = dict(data)
    np.savez(tmp_path / "short.npz", **{**fields, "weights": fields["weights"][:-1]})
    with pytest.raises(ValueError, match=r"short\.npz: weights has shape \(262146,\)"):
        QualityClassifier.load(tmp_path / "short.npz")
    np.savez(tmp_path / "version.npz", **{**fields, "config": np.array('{"format_version": 99, "features": {}}')})
    with pytest.raises(ValueError, match=r"version\.npz: format_version is 99"):
        QualityClassifier.load(tmp_path / "version.npz")
    np.savez(tmp_path / "other.npz", weights=fields["weights"])
    with pytest.raises(ValueError, match=r"other\.npz: not a quality classifier, missing field 'config'"):
        QualityClassifier.load(tmp_path / "other.npz")


def test_auc_counts_ties_as_half():
    assert _roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert _roc_auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == 0.5
    assert np.isnan(_roc_auc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_tiers_and_weights(separable):
    config = TierConfig()
    tiers = assign_tiers([0.0, 0.29, 0.3, 0.69, 0.7, 1.0], config)
    assert tiers == ["low", "low", "moderate", "moderate", "high", "high"]
    assert [config.weight(t) for t in tiers] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert config.weight("high") == 2.0
    with pytest.raises(ValueError, match="unknown tier"):
        config.weight("default")
    # Documents that must pass and must fail: the learnt class lands in the up-sampled tier, the other is dropped.
    classifier, _, (texts, labels) = separable
    tiers = assign_tiers(classifier.score(texts), config)
    assert np.mean([tier == "high" for tier, y in zip(tiers, labels, strict=True) if y]) > 0.9
    assert np.mean([tier == "low" for tier, y in zip(tiers, labels, strict=True) if not y]) > 0.9


@pytest.mark.parametrize("kwargs, field", [
    ({"high_threshold": 1.5}, "high_threshold"),
    ({"low_threshold": -0.1}, "low_threshold"),
    ({"low_threshold": 0.8, "high_threshold": 0.6}, "low_threshold"),
    ({"moderate_weight": -1.0}, "moderate_weight"),
    ({"high_weight": float("inf")}, "high_weight"),
])
def test_tier_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"TierConfig.{field}"):
        TierConfig(**kwargs)


def test_code_signals_and_heuristic_labels():
    good = code_quality_signals(GOOD_MODULE)
    assert good["parses"] == 1 and good["docstring_ratio"] == 1 and good["module_docstring"] == 1
    assert good["has_tests"] == 1  # the doctest
    bad = code_quality_signals(BAD_BLOB)
    assert bad["docstring_ratio"] == 0 and bad["comment_ratio"] == 0 and bad["long_line_fraction"] > 0.05
    assert bad["short_identifier_fraction"] > 0.5 and bad["max_line_length"] > 120
    assert heuristic_code_label(GOOD_MODULE) == "high"
    assert heuristic_code_label(BAD_BLOB) == "low"
    assert heuristic_code_label(GOOD_MODULE.replace("def dump(sections):", "def dump(sections:")) == "low"
    assert heuristic_code_label("x = 1\n") is None  # too short to judge
    # Commented but undocumented code is in between: not confidently either.
    middle = "\n".join(f"def function_{i}(value):\n    # Scale the value.\n    return value * {i}\n" for i in range(5))
    assert heuristic_code_label(middle) is None


def test_stdlib_recipe_generalises_the_heuristic():
    texts = [doc.text for doc in stdlib_corpus("train", max_bytes=4_000_000)]
    assert len(texts) > 250
    classifier, report = label_and_train(texts, seed=0)
    assert sum(report.labelled.values()) == len(texts)
    assert min(report.labelled["high"], report.labelled["low"]) > 40
    assert report.train + report.heldout == 2 * min(report.labelled["high"], report.labelled["low"])
    assert report.heldout_accuracy > 0.75 and report.heldout_auc > 0.75
    good, bad = classifier.score([GOOD_MODULE, BAD_BLOB])
    assert good > 0.5 and good > bad
