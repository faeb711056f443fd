"""Report-generation metrics as the captioning literature computes them (coco-caption / pycocoevalcap, the
scorers R2GenGPT calls): BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) over {id: [text]} dictionaries.

    scores = compute_scores(refs, hyps)      # refs {id: [ref, ...]}, hyps {id: [hyp]} (exactly one)
    best = weighted_score(scores, {"BLEU_4": 0.5, "CIDEr": 0.5})

Like R2GenGPT, texts are not re-tokenised (no PTB tokenizer): cleaned reports already separate punctuation.
BLEU, ROUGE-L and CIDEr are computed here with coco-caption's exact arithmetic (tests compare with
pycocoevalcap when it is installed):
  BLEU    corpus level: clipped n-gram counts summed over all studies, geometric mean of the 1..n precisions
          (smoothing constants 1e-15 / 1e-9 as coco-caption), brevity penalty exp(1 - r/c) when c < r with
          r the sum of each study's "closest" reference length (ties -> the shorter). Tokens: str.split().
  ROUGE-L per study: LCS against each reference, P = max_refs LCS/|hyp|, R = max_refs LCS/|ref|,
          F = (1 + b^2) P R / (R + b^2 P), b = 1.2; averaged over studies. Tokens: str.split(" ") as
          coco-caption, so a double space makes an empty token.
  CIDEr   CIDEr-D: tf-idf n-gram vectors (n = 1..4), document frequency over the references of the evaluated
          corpus (idf = log(#studies) - log(max(1, df))), hypothesis weights clipped at the reference's,
          Gaussian length penalty exp(-d^2 / (2 * 6^2)) with d the token-count difference (coco-caption counts
          bigrams, which gives the same d whenever the score can be non-zero: both texts non-empty), mean over n,
          mean over references, times 10; averaged over studies.
METEOR has two backends:
  "java"    the official Meteor 1.5 jar (java -jar meteor-1.5.jar - - -stdio -l en -norm, as coco-caption and
            R2GenGPT run it; whitespace collapsed and '|||' removed as R2GenGPT's wrapper does). Needs `java`
            and the jar that the pycocoevalcap package ships. These are the numbers papers report.
  "python"  written here, NOT the same numbers: Meteor 1.5's scoring with its English parameters (alpha 0.85,
            beta 0.2, gamma 0.6; P, R, F = PR / (alpha P + (1 - alpha) R), penalty gamma (chunks/matches)^beta,
            an identical hypothesis counts 0 chunks, best reference per study, corpus score from the statistics
            summed over studies) but only EXACT matching of lower-cased tokens (punctuation split off), every
            token weighted alike. Meteor 1.5 also matches stems, WordNet synonyms and paraphrases (more matches)
            and weighs function words and punctuation 0.25 against 0.75 for content words (reports share many
            of those, so their matches count less there), so the two differ in either direction: on 1000
            synthetic reports the variant read 0.315 where the jar read 0.294. It agrees with the jar to 1e-12
            where neither the extra matchers nor function words apply (tested).
  "auto" (default) uses java when available, otherwise python with a warning; meteor_backend() tells which.
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from stablelm.cli import HelpFormatter

METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


def _check(refs, hyps) -> list:
    """Validate the {id: [text]} dictionaries (coco-caption's contract) and return the ids in refs' order."""
    if not isinstance(refs, Mapping) or not isinstance(hyps, Mapping):
        raise TypeError(f"refs and hyps must be dicts {{id: [text]}}, got {type(refs).__name__}, "
                        f"{type(hyps).__name__}")
    if not refs:
        raise ValueError("no studies to score (refs is empty)")
    if set(refs) != set(hyps):
        missing, extra = set(refs) - set(hyps), set(hyps) - set(refs)
        raise ValueError(f"refs and hyps must have the same ids: {len(missing)} without a hypothesis "
                         f"(e.g. {sorted(map(str, missing))[:3]}), {len(extra)} without references "
                         f"(e.g. {sorted(map(str, extra))[:3]})")
    for k in refs:
        r, h = refs[k], hyps[k]
        if not isinstance(r, list) or not r or not all(isinstance(t, str) for t in r):
            raise ValueError(f"refs[{k!r}] must be a non-empty list of strings, got {r!r:.80}")
        if not isinstance(h, list) or len(h) != 1 or not isinstance(h[0], str):
            raise ValueError(f"hyps[{k!r}] must be a list holding exactly one string, got {h!r:.80}")
    return list(refs)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


# ---------------------------------------------------------------------------- BLEU
def bleu(refs, hyps, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as coco-caption's Bleu(n) ("closest" reference length)."""
    ids = _check(refs, hyps)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for k in ids:
        hyp = hyps[k][0].split()
        ref_tokens = [r.split() for r in refs[k]]
        max_ref = Counter()
        for toks in ref_tokens:
            max_ref |= _ngrams(toks, n)  # | keeps the larger count per n-gram
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for j in range(n):
            guess[j] += max(0, len(hyp) - j)
        hyp_len += len(hyp)
        ref_len += min((abs(len(t) - len(hyp)), len(t)) for t in ref_tokens)[1]
    scores, prod = [], 1.0
    for j in range(n):
        prod *= (correct[j] + tiny) / (guess[j] + small)
        scores.append(prod ** (1.0 / (j + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# ---------------------------------------------------------------------------- ROUGE-L
def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, bit-parallel (Allison-Dix / Hyyro): one big-int step per token of b."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = masks.get(tok, 0)
        v = ((v + (v & m)) | (v & ~m)) & full
    return len(a) - bin(v).count("1")


def rouge_l(refs, hyps, beta: float = 1.2) -> float:
    """Mean ROUGE-L F-score as coco-caption's Rouge() (max precision and max recall over references)."""
    ids = _check(refs, hyps)
    total = 0.0
    for k in ids:
        hyp = hyps[k][0].split(" ")
        prec = rec = 0.0
        for r in refs[k]:
            ref = r.split(" ")
            lcs = _lcs_length(ref, hyp)
            prec, rec = max(prec, lcs / len(hyp)), max(rec, lcs / len(ref))
        if prec > 0 and rec > 0:
            total += (1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec)
    return total / len(ids)


# ---------------------------------------------------------------------------- CIDEr-D
def cider(refs, hyps, n: int = 4, sigma: float = 6.0) -> float:
    """Mean CIDEr-D as coco-caption's Cider() (document frequency over this corpus' references)."""
    ids = _check(refs, hyps)
    ref_tokens = {k: [r.split() for r in refs[k]] for k in ids}
    ref_counts = {k: [_ngrams(t, n) for t in ref_tokens[k]] for k in ids}
    df: Counter = Counter()
    for counts in ref_counts.values():
        df.update(set().union(*counts))
    log_docs = math.log(len(ids))

    def vectors(counts: Counter):
        vec = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            w = tf * (log_docs - math.log(max(1.0, df[gram])))
            vec[len(gram) - 1][gram] = w
            norm[len(gram) - 1] += w * w
        return vec, [math.sqrt(x) for x in norm]

    total = 0.0
    for k in ids:
        hyp = hyps[k][0].split()
        vh, nh = vectors(_ngrams(hyp, n))
        score = 0.0
        for tokens, counts in zip(ref_tokens[k], ref_counts[k]):
            vr, nr = vectors(counts)
            penalty = math.exp(-((len(hyp) - len(tokens)) ** 2) / (2 * sigma ** 2))
            for j in range(n):
                val = sum(min(w, vr[j].get(g, 0.0)) * vr[j].get(g, 0.0) for g, w in vh[j].items())
                if nh[j] != 0 and nr[j] != 0:
                    val /= nh[j] * nr[j]
                score += val * penalty
        total += score / n / len(refs[k]) * 10.0
    return total / len(ids)


# ---------------------------------------------------------------------------- METEOR
ALPHA, BETA, GAMMA = 0.85, 0.2, 0.6  # Meteor 1.5's English ("-l en") parameters
_TOKEN = re.compile(r"\w+|[^\w\s]")


def _exact_alignment(hyp: list[str], ref: list[str]) -> tuple[int, int]:
    """(matches, chunks) of a maximum exact one-to-one alignment. Fewest chunks is sought greedily: the longest
    common run of unaligned tokens first (earliest in the hypothesis on ties), then the single tokens left, in
    hypothesis order, each continuing its predecessor's chunk where it can."""
    where: dict[str, list[int]] = {}
    for j, tok in enumerate(ref):
        where.setdefault(tok, []).append(j)
    candidates = [(i, j) for i, tok in enumerate(hyp) for j in where.get(tok, ())]
    partner: dict[int, int] = {}  # hypothesis position -> reference position
    used = set()
    while True:
        run: dict[tuple[int, int], int] = {}
        best = (0, 0, 0)  # (length, i, j)
        for i, j in reversed(candidates):  # from the end, so a run's length is known from its successor
            if i in partner or j in used:
                continue
            length = run[i, j] = run.get((i + 1, j + 1), 0) + 1
            if length >= best[0]:
                best = (length, i, j)
        length, i, j = best
        if length <= 1:
            break
        for d in range(length):
            partner[i + d] = j + d
            used.add(j + d)
    for i, tok in enumerate(hyp):
        if i in partner:
            continue
        free = [j for j in where.get(tok, ()) if j not in used]
        if free:
            after_prev = partner.get(i - 1, -2) + 1
            partner[i] = after_prev if after_prev in free else free[0]
            used.add(partner[i])
    pairs = sorted(partner.items())
    chunks = sum(1 for p, q in zip(pairs, pairs[1:]) if q != (p[0] + 1, p[1] + 1)) + bool(pairs)
    return len(pairs), chunks


def _meteor_stats(hyp: list[str], ref: list[str]) -> tuple[int, int, int, int]:
    """(hyp length, ref length, matches, chunks); an identical pair counts 0 chunks, which is how Meteor 1.5
    waives the fragmentation penalty for it, in its segment score and in the corpus score alike."""
    matches, chunks = _exact_alignment(hyp, ref)
    if matches == len(hyp) == len(ref) and chunks == 1:
        chunks = 0
    return len(hyp), len(ref), matches, chunks


def _meteor_from_stats(hyp_len: int, ref_len: int, matches: int, chunks: int) -> float:
    if matches == 0:
        return 0.0
    p, r = matches / hyp_len, matches / ref_len
    return p * r / (ALPHA * p + (1 - ALPHA) * r) * (1.0 - GAMMA * (chunks / matches) ** BETA)


def _meteor_python(refs, hyps, ids) -> float:
    totals = [0, 0, 0, 0]
    for k in ids:
        hyp = _TOKEN.findall(hyps[k][0].lower())
        candidates = [_meteor_stats(hyp, _TOKEN.findall(r.lower())) for r in refs[k]]
        best = max(candidates, key=lambda stats: _meteor_from_stats(*stats))
        totals = [t + s for t, s in zip(totals, best)]
    return _meteor_from_stats(*totals)


def _meteor_jar() -> Path | None:
    spec = importlib.util.find_spec("pycocoevalcap")
    roots = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    for root in roots:
        jar = Path(root) / "meteor" / "meteor-1.5.jar"
        if jar.is_file():
            return jar
    return None


class _MeteorJava:
    """One long-lived Meteor 1.5 process (it takes seconds to load its paraphrase table), spoken to through
    its -stdio protocol: "SCORE ||| ref ... ||| hyp" -> a statistics line per study, then
    "EVAL ||| stats ||| ..." -> one score line per study and the corpus score."""

    def __init__(self, jar: Path):
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            ["java", "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"], cwd=jar.parent,
            env={**os.environ, "LC_ALL": "C"}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._lock = threading.Lock()

    def _ask(self, line: str) -> str:
        self._proc.stdin.write((line + "\n").encode())
        self._proc.stdin.flush()
        return self._read()

    def _read(self) -> str:
        out = self._proc.stdout.readline().decode().strip()
        if not out:
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"the Meteor 1.5 process stopped answering (exit code {self._proc.poll()}): {err}")
        return out

    def score(self, refs, hyps, ids) -> float:
        def clean(text):
            return re.sub(r"\s+", " ", text.replace("|||", "")).strip()
        with self._lock:
            try:
                stats = [self._ask(" ||| ".join(["SCORE", *map(clean, refs[k]), clean(hyps[k][0])])) for k in ids]
                self._ask(" ||| ".join(["EVAL", *stats]))  # first answer: the first study's score
                for _ in ids[1:]:
                    self._read()
                return float(self._read())
            except Exception:
                self.close()  # out of step with the protocol now: the next call starts a fresh process
                raise

    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self):
        if self.alive():
            self._proc.kill()
        self._proc.wait()
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._stderr.close()


_java_process: _MeteorJava | None = None
_warned_fallback = False


def meteor_backend(backend: str = "auto") -> str:
    """The METEOR backend `backend` resolves to: "java" or "python" (raises if "java" is asked for and missing)."""
    if backend not in ("auto", "java", "python"):
        raise ValueError(f"meteor backend {backend!r}: choose 'auto', 'java' or 'python'")
    if backend == "python":
        return "python"
    missing = [what for what, ok in (("a `java` executable on PATH", shutil.which("java")),
                                     ("the pycocoevalcap package (it ships meteor-1.5.jar)", _meteor_jar()))
               if not ok]
    if not missing:
        return "java"
    if backend == "java":
        raise RuntimeError(f"METEOR backend 'java' needs {' and '.join(missing)}")
    return "python"


def meteor(refs, hyps, backend: str = "auto") -> float:
    """Corpus METEOR; see the module docstring for the two backends."""
    global _java_process, _warned_fallback
    ids = _check(refs, hyps)
    chosen = meteor_backend(backend)
    if chosen == "python":
        if backend == "auto" and not _warned_fallback:
            warnings.warn("Meteor 1.5 (java + pycocoevalcap) is not available: METEOR comes from the exact-match "
                          "Python variant, which is not comparable with published numbers", stacklevel=2)
            _warned_fallback = True
        return _meteor_python(refs, hyps, ids)
    if _java_process is None or not _java_process.alive():
        _java_process = _MeteorJava(_meteor_jar())
        atexit.register(_java_process.close)
    return _java_process.score(refs, hyps, ids)


# ---------------------------------------------------------------------------- all together
def compute_scores(refs, hyps, meteor_impl: str = "auto") -> dict[str, float]:
    """{"BLEU_1".."BLEU_4", "METEOR", "ROUGE_L", "CIDEr"} for refs {id: [ref, ...]} and hyps {id: [hyp]}."""
    scores = dict(zip(METRICS[:4], bleu(refs, hyps, 4)))
    scores["METEOR"] = meteor(refs, hyps, meteor_impl)
    scores["ROUGE_L"] = rouge_l(refs, hyps)
    scores["CIDEr"] = cider(refs, hyps)
    return scores


def weighted_score(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum(weight * score) over the named metrics; R2GenGPT picks its best checkpoint with
    {"BLEU_4": 0.5, "CIDEr": 0.5}."""
    if not weights:
        raise ValueError("weights is empty: name at least one metric, e.g. {'BLEU_4': 0.5, 'CIDEr': 0.5}")
    unknown = [k for k in weights if k not in scores]
    if unknown:
        raise KeyError(f"weights name metrics {unknown} that are not in the scores {sorted(scores)}")
    return float(sum(float(w) * scores[k] for k, w in weights.items()))


def main(argv=None) -> dict:
    """Re-score a results file of vision.evaluate ({"samples": [{"id", "reference", "generated"}]}), e.g. on a
    machine with Java after generating on one without: python -m vision.metrics results.json [--meteor java]"""
    ap = argparse.ArgumentParser(prog="python -m vision.metrics", description=main.__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--meteor", default="auto", choices=["auto", "java", "python"],
                    help="METEOR backend: the Meteor 1.5 jar (java), the exact-match variant (python), or java if found")
    args = ap.parse_args(argv)
    samples = json.loads(Path(args.results).read_text())["samples"]
    refs = {s["id"]: [s["reference"]] for s in samples}
    hyps = {s["id"]: [s["generated"]] for s in samples}
    scores = compute_scores(refs, hyps, args.meteor)
    json.dump({"meteor_backend": meteor_backend(args.meteor), **scores}, sys.stdout, indent=2)
    print()
    return scores


if __name__ == "__main__":
    main()
