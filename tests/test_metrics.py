"""Report metrics: hand-computed BLEU / ROUGE-L / CIDEr-D / METEOR cases, limits (identical, disjoint), and
agreement with the reference implementations (pycocoevalcap's scorers, the Meteor 1.5 jar) when installed."""
import json
import math
import shutil
import warnings

import numpy as np
import pytest

from vision import metrics
from vision.data import clean_report_iu_xray
from vision.metrics import bleu, cider, compute_scores, meteor, meteor_backend, rouge_l, weighted_score
from vision.synthetic import sample_findings, write_report

try:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    HAVE_COCO = True
except ImportError:
    HAVE_COCO = False
needs_coco = pytest.mark.skipif(not HAVE_COCO, reason="pycocoevalcap (the reference implementation) is not installed")
needs_java_meteor = pytest.mark.skipif(
    not (HAVE_COCO and shutil.which("java")), reason="the Meteor 1.5 reference needs java and pycocoevalcap's jar")


def _d(*texts):
    return {str(i): [t] if isinstance(t, str) else list(t) for i, t in enumerate(texts)}


def _report_sets(seed, n):
    """Cleaned synthetic reports; hypotheses share the findings half the time, with a few odd cases mixed in."""
    rng = np.random.default_rng(seed)
    refs, hyps = {}, {}
    for i in range(n):
        findings = sample_findings(rng)
        refs[f"r{i}"] = [clean_report_iu_xray(write_report(findings, rng)) for _ in range(1 + i % 3)]
        other = findings if rng.random() < 0.5 else sample_findings(rng)
        hyps[f"r{i}"] = [clean_report_iu_xray(write_report(other, rng))]
    hyps["r0"] = [""]                                   # an empty generation
    hyps["r1"] = [hyps["r1"][0].replace(" ", "  ", 2)]  # double spaces: empty ROUGE tokens
    hyps["r2"] = [refs["r2"][0]]                        # a perfect one
    return refs, hyps


# ---------------------------------------------------------------------------- BLEU
def test_bleu_hand_computed():
    # clipped matches 5/6, 3/5, 1/4, 0/3; equal lengths -> no brevity penalty
    b = bleu(_d("the cat sat on the mat"), _d("the cat is on the mat"))
    assert b[0] == pytest.approx(5 / 6, rel=1e-8)
    assert b[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), rel=1e-8)
    assert b[2] == pytest.approx(0.5, rel=1e-8)
    assert b[3] == pytest.approx((5 / 6 * 3 / 5 / 4 * 1e-15 / 3) ** 0.25, rel=1e-6)   # coco's 1e-15 smoothing
    # brevity penalty exp(1 - r/c) = exp(1 - 6/2)
    b = bleu(_d("the cat sat on the mat"), _d("the cat"))
    assert b[0] == pytest.approx(math.exp(-2), rel=1e-8) and b[1] == pytest.approx(math.exp(-2), rel=1e-8)
    # "closest" reference length: 3 and 7 tie for a 5-token hypothesis; the shorter wins -> no penalty
    assert bleu(_d(["a b c", "a b c d e f g"]), _d("a b c d e"))[1] == pytest.approx(1.0, rel=1e-8)
    # corpus level, not an average of sentence scores: (2 + 0) / (2 + 4) unigram matches
    assert bleu(_d("a b", "x y z w"), _d("a b", "c d e f"))[0] == pytest.approx(1 / 3, rel=1e-8)


# ---------------------------------------------------------------------------- ROUGE-L
def test_rouge_l_hand_computed():
    f = lambda p, r: (1 + 1.44) * p * r / (r + 1.44 * p)  # noqa: E731  beta = 1.2
    assert rouge_l(_d("a c e d b"), _d("a b c d")) == pytest.approx(f(3 / 4, 3 / 5), rel=1e-12)  # LCS "a c d"
    # max precision and max recall may come from different references
    assert rouge_l(_d(["a b", "a b c d e f g h"]), _d("a b c d")) == pytest.approx(1.0, rel=1e-12)
    # split(" ") as coco-caption: "a  b" has an empty middle token
    assert rouge_l(_d("a b"), _d("a  b")) == pytest.approx(f(2 / 3, 1.0), rel=1e-12)
    assert rouge_l(_d("a b c", "x y"), _d("a b c", "p q")) == pytest.approx(0.5, rel=1e-12)


def test_lcs_matches_dynamic_programming():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = list(rng.choice(list("abcde"), rng.integers(1, 30)))
        b = list(rng.choice(list("abcdef"), rng.integers(1, 30)))
        table = np.zeros((len(a) + 1, len(b) + 1), int)
        for i in range(len(a)):
            for j in range(len(b)):
                table[i + 1, j + 1] = table[i, j] + 1 if a[i] == b[j] else max(table[i, j + 1], table[i + 1, j])
        assert metrics._lcs_length(a, b) == table[-1, -1]


# ---------------------------------------------------------------------------- CIDEr-D
def test_cider_hand_computed():
    idf = math.log(2)   # two studies, every reference n-gram in one of them
    # study 1: identical unigram and bigram vectors (cosine 1), no 3/4-grams: (1 + 1 + 0 + 0) / 4 * 10 = 5;
    # study 2: no overlap -> 0
    assert cider(_d("a b", "e f"), _d("a b", "c d")) == pytest.approx(2.5, rel=1e-12)
    # a longer hypothesis: unseen "x" still weighs idf (df floor 1), lengths differ by one
    uni = 2 * idf ** 2 / (math.sqrt(3) * idf * math.sqrt(2) * idf)
    bi = idf ** 2 / (math.sqrt(2) * idf * idf)
    expected = (uni + bi) * math.exp(-1 / 72) / 4 * 10 / 2
    assert cider(_d("a b", "e f"), _d("a b x", "c d")) == pytest.approx(expected, rel=1e-12)
    # clipping: "a a" against "a": min(2w, w) * w / (2w * w) = 0.5; lengths 2 and 1
    assert cider(_d("a", "e f"), _d("a a", "c d")) == pytest.approx(0.5 * math.exp(-1 / 72) / 4 * 10 / 2, rel=1e-12)


# ---------------------------------------------------------------------------- METEOR (Python variant)
def test_meteor_python_hand_computed():
    a, b, g = metrics.ALPHA, metrics.BETA, metrics.GAMMA
    # 6 exact matches in 2 chunks, P = 6/7, R = 1
    p, r = 6 / 7, 1.0
    expected = p * r / (a * p + (1 - a) * r) * (1 - g * (2 / 6) ** b)
    assert meteor(_d("qa1 qb2 qc3 qd4 qe5 qf6"), _d("qa1 qb2 qc3 xx9 qd4 qe5 qf6"), "python") == pytest.approx(expected)
    assert meteor(_d("qa1 qb2", "qc3"), _d("qa1 qb2", "qc3"), "python") == 1.0
    assert meteor(_d("qa1 qb2"), _d("zz1 zz2"), "python") == 0.0
    # an identical study counts no chunks in the corpus score (Meteor 1.5's aggregation; checked against the jar)
    p, r = 1.0, 1 / 3
    assert meteor(_d("qk1 qk2", "abc"), _d("", "abc"), "python") == pytest.approx(p * r / (a * p + (1 - a) * r))


def test_exact_alignment_prefers_long_runs():
    assert metrics._exact_alignment("a b c x d e f".split(), "a b c d e f".split()) == (6, 2)
    # the run "the heart is" is matched as one chunk even though "the" and "heart" also occur later
    assert metrics._exact_alignment("x the heart is".split(), "the heart is the heart".split()) == (3, 1)
    assert metrics._exact_alignment([], ["a"]) == (0, 0)


# ---------------------------------------------------------------------------- limits, API
@pytest.mark.parametrize("backend", ["python", pytest.param("java", marks=needs_java_meteor)])
def test_identical_and_disjoint(backend):
    refs = _d("the heart is normal in size . no effusion .", "there is a small left pleural effusion .",
              "lungs are clear . no pneumothorax .")
    same = compute_scores(refs, {k: [v[0]] for k, v in refs.items()}, backend)
    assert set(same) == set(metrics.METRICS)
    for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"):
        assert same[k] == pytest.approx(1.0, abs=1e-8)
    assert same["ROUGE_L"] == 1.0 and same["METEOR"] == pytest.approx(1.0)
    assert same["CIDEr"] == pytest.approx(10.0, rel=1e-12)
    other = compute_scores(refs, _d("qq1 qq2 qq3", "zz zz zz zz", "ww1"), backend)
    assert all(other[k] < 1e-6 for k in other), other


def test_input_errors():
    with pytest.raises(ValueError, match="same ids"):
        compute_scores({"a": ["x"]}, {"b": ["x"]})
    with pytest.raises(ValueError, match=r"hyps\['a'\] must be a list holding exactly one string"):
        bleu({"a": ["x"]}, {"a": ["x", "y"]})
    with pytest.raises(ValueError, match=r"refs\['a'\] must be a non-empty list"):
        rouge_l({"a": []}, {"a": ["x"]})
    with pytest.raises(ValueError, match="refs is empty"):
        cider({}, {})
    with pytest.raises(TypeError, match="dicts"):
        bleu([["x"]], [["x"]])
    with pytest.raises(ValueError, match="meteor backend 'jvm'"):
        meteor({"a": ["x"]}, {"a": ["x"]}, "jvm")


def test_weighted_score():
    scores = {"BLEU_4": 0.2, "CIDEr": 0.6, "METEOR": 0.3}
    assert weighted_score(scores, {"BLEU_4": 0.5, "CIDEr": 0.5}) == pytest.approx(0.4)
    assert weighted_score(scores, {"METEOR": 2.0}) == pytest.approx(0.6)
    with pytest.raises(KeyError, match="Bleu_4"):
        weighted_score(scores, {"Bleu_4": 1.0})
    with pytest.raises(ValueError, match="empty"):
        weighted_score(scores, {})


def test_auto_backend_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    monkeypatch.setattr(metrics, "_warned_fallback", False)
    assert meteor_backend("auto") == "python"
    with pytest.raises(RuntimeError, match="needs a `java` executable"):
        meteor_backend("java")
    refs, hyps = _d("qa1 qb2 qc3"), _d("qa1 qc3 qb2")
    with pytest.warns(UserWarning, match="not comparable with published numbers"):
        assert meteor(refs, hyps) == meteor(refs, hyps, "python")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # warned once only
        meteor(refs, hyps)


def test_rescoring_cli(tmp_path, capsys):
    samples = [{"id": "a", "reference": "the heart is normal .", "generated": "the heart is normal ."},
               {"id": "b", "reference": "no effusion .", "generated": "small effusion ."}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"samples": samples}))
    scores = metrics.main([str(path), "--meteor", "python"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["meteor_backend"] == "python" and printed["BLEU_1"] == scores["BLEU_1"]
    assert scores == compute_scores({"a": ["the heart is normal ."], "b": ["no effusion ."]},
                                    {"a": ["the heart is normal ."], "b": ["small effusion ."]}, "python")


# ---------------------------------------------------------------------------- reference implementations
@needs_coco
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocoevalcap(seed):
    refs, hyps = _report_sets(seed, 40 + 20 * seed)
    ref_bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    ref_rouge, _ = Rouge().compute_score(refs, hyps)
    ref_cider, _ = Cider().compute_score(refs, hyps)
    assert bleu(refs, hyps) == pytest.approx(ref_bleu, rel=1e-10, abs=1e-15)
    assert rouge_l(refs, hyps) == pytest.approx(ref_rouge, rel=1e-10)
    assert cider(refs, hyps) == pytest.approx(ref_cider, rel=1e-10)
    assert 0.05 < ref_bleu[3] < 0.95 and 0.1 < ref_cider   # the sets are neither trivial nor disjoint


@needs_java_meteor
def test_python_meteor_equals_the_jar_without_stems_synonyms_or_function_words():
    """Made-up tokens (no stems, synonyms, paraphrases or function words): only exact matching applies, so the
    variant must reproduce Meteor 1.5 exactly, repeated tokens (the chunk search) and several references
    included."""
    rng = np.random.default_rng(5)
    codes = ["".join(rng.choice(list("bcdfghjklmnpqrstvwxz"), 3)) + str(d) for d in range(10) for _ in range(3)]
    for repeated in (False, True):
        pool = codes[:5] if repeated else codes
        sent = lambda: " ".join(rng.choice(pool, rng.integers(1, 12), replace=repeated))  # noqa: E731
        refs = {i: [sent() for _ in range(rng.integers(1, 4))] for i in range(12)}
        hyps = {i: [sent()] for i in range(12)}
        hyps[0] = [refs[0][0]]
        assert meteor(refs, hyps, "python") == pytest.approx(meteor(refs, hyps, "java"), rel=1e-12)


@needs_java_meteor
def test_java_meteor_on_reports():
    """The jar behind our protocol wrapper: the published values' scale on report text, and the variant's gap."""
    refs, hyps = _report_sets(3, 60)
    java, python = meteor(refs, hyps, "java"), meteor(refs, hyps, "python")
    assert 0.1 < java < 0.9
    assert abs(java - python) < 0.1
    assert meteor_backend("auto") == "java" and compute_scores(refs, hyps)["METEOR"] == java


@needs_java_meteor
def test_java_meteor_restarts_after_its_process_died():
    refs, hyps = _d("the heart is normal .", "no effusion ."), _d("the heart is normal .", "small effusion .")
    first = meteor(refs, hyps, "java")
    metrics._java_process._proc.kill()
    metrics._java_process._proc.wait()
    assert meteor(refs, hyps, "java") == first
