"""The 3D-QA field's answer metrics, torch-free: EM@1 and refined EM with ScanQA's answer
normalisation (as LLaVA-3D's ScanQA / SQA3D evaluators compute them), and BLEU-4 / CIDEr through
pycocoevalcap when it is installed (``pip install adatoken-compile[metrics]``).

pycocoevalcap's PTB tokenizer runs Java; :func:`ptb_tokens` does its job in Python for the text
:func:`clean_answer` leaves (letters, digits, spaces, ``, ' - :``): lower case, clitics split
(``it's`` -> ``it 's``, ``don't`` -> ``do n't``), quotes and punctuation tokens dropped, hyphenated
words kept whole. BLEU and CIDEr themselves are pycocoevalcap's (pure Python).
"""

from __future__ import annotations

import re
from typing import Sequence

# ScanQA's answer normalisation (LEO's, used by LLaVA-3D's evaluators), step by step.
_TYPOS = {"letf": "left", "let": "left", "tehre": "there", "rigth": "right", "rght": "right", "behine": "behind",
          "tv": "TV", "chai": "chair", "wasing": "washing", "waslked": "walked", "oclock": "o'clock"}
_NUMBERS = {"0": "zero", "none": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
            "7": "seven", "8": "eight", "9": "nine", "10": "ten", "11": "eleven", "12": "twelve", "13": "thirteen",
            "14": "fourteen", "15": "fifteen", "16": "sixteen", "17": "seventeen", "18": "eighteen",
            "19": "nineteen", "20": "twenty", "23": "twenty-three"}
_STEPS = (
    [(re.compile(r"[ ]+$"), ""), (re.compile(r"^[ ]+"), ""), (re.compile(r" {2,}"), " "),
     (re.compile(r"\.[ ]{2,}"), ". "), (re.compile(r"[^a-zA-Z0-9,'\s\-:]+"), "")]
    + [(re.compile(rf"\b{w}\b"), r) for w, r in _TYPOS.items()]
    + [(re.compile(r"\bo'[ ]+clock\b"), "o'clock")]
    + [(re.compile(rf"\b{w}\b"), r) for w, r in _NUMBERS.items()]
    + [(re.compile(r"\b([a-zA-Z]+)([0-9])\b"), r"\g<1>")]  # no1, mat2 -> no, mat
    + [(re.compile(rf"\b{a}\b ([a-zA-Z]+)"), r"\g<1>") for a in ("a", "an", "the")]
    + [(re.compile(r"\bbackwards\b"), "backward")]
)
PUNCTUATION_TOKENS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                      "...", ";"}
CLITICS = ("n't", "'s", "'re", "'m", "'ll", "'ve", "'d")
_CLITIC = re.compile(rf"^(.+?)({'|'.join(CLITICS)})$")
_SPLIT = re.compile(r"([,:;?!]|\.\.\.|\.$)")


def clean_answer(text: str) -> str:
    """ScanQA's normalisation: lower case, punctuation dropped, typos mended, numbers as words,
    articles dropped."""
    s = str(text).lower()
    for pat, rep in _STEPS:
        s = pat.sub(rep, s)
    return s


def answer_match(pred: str, refs: Sequence[str]) -> tuple[int, int]:
    """(EM, refined EM) of a cleaned prediction against cleaned references: exact membership, or
    (refined) one contains the other once spaces are removed."""
    if pred in refs:
        return 1, 1
    p = "".join(pred.split())
    for r in refs:
        g = "".join(r.split())
        if p in g or g in p:
            return 0, 1
    return 0, 0


def ptb_tokens(text: str) -> str:
    """The PTB tokenizer's output (lower-cased, space-joined, punctuation tokens removed) for
    cleaned answer text."""
    out = []
    for word in _SPLIT.sub(r" \1 ", text.lower()).split():
        if word in CLITICS:  # standing alone ("couch 's")
            out.append(word)
            continue
        word = word.strip("'`")
        m = _CLITIC.match(word)
        out.extend(p for p in ((m.group(1), m.group(2)) if m else (word,)) if p and p not in PUNCTUATION_TOKENS)
    return " ".join(out)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU-4 and CIDEr of the predictions against their references, both cleaned and
    tokenized as ScanQA's evaluator does (pycocoevalcap), or ``{"caption_metrics_unavailable":
    why}`` when it is not installed. Every question needs at least one reference."""
    try:  # optional: pycocoevalcap is the `metrics` extra, not a base dependency
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return {"caption_metrics_unavailable": "pip install 'adatoken-compile[metrics]' (pycocoevalcap) for BLEU-4 "
                                               "and CIDEr"}
    res = {i: [ptb_tokens(clean_answer(p))] for i, p in enumerate(predictions)}
    gts = {i: [ptb_tokens(clean_answer(r)) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
