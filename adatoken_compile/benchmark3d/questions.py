"""Questions with one-word answers, ground truth computed from the scene geometry.

Templates (``kind`` / ``template``):

=============  ===============  =====================================================  ==========
kind           template         text                                                   answers
=============  ===============  =====================================================  ==========
attribute      color_of_class   what color is the {class}?                             6 colours
attribute      class_of_color   what is the {color} object?                            5 classes
counting       count            how many {classes} are there?                          0 .. 4
existence      exist            is there a {class} in the room?                        yes / no
relation       closer           which is closer to the {c0} object, the {c1} one or    c1 / c2
                                the {c2} one?
relation       farther          which is farther from the {c0} object, the {c1} one    c1 / c2
                                or the {c2} one?
relation       closer_yesno     is the {c0} object closer to the {c1} object than to   yes / no
                                the {c2} object?
=============  ===============  =====================================================  ==========

Objects are referred to only when the reference is unique (``the ball``: exactly one ball;
``the red object``: exactly one red object). Distances are between object centres on the floor
plane (xy, world frame, view independent); relation questions whose two distances differ by
less than ``MIN_GAP`` metres are skipped.

Balance (the text alone does not predict the answer): counting and existence ask about the
classes planned by the world generator (count uniform in 0..4, presence with probability 1/2);
colours are i.i.d. uniform per object and object classes are exchangeable, so attribute answers
are uniform per text; relation questions refer to objects by colour only, with the order of the
two candidates random, so by colour exchangeability each answer has probability 1/2 per text.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES, MAX_COUNT, PLURALS, SceneInfo, _rng

KINDS = ("attribute", "counting", "relation", "existence")
TEMPLATES = {
    "color_of_class": "attribute",
    "class_of_color": "attribute",
    "count": "counting",
    "exist": "existence",
    "closer": "relation",
    "farther": "relation",
    "closer_yesno": "relation",
}
MIN_GAP = 0.5  # metres
NUM_RELATION = 3  # relation questions per scene (when the scene allows)


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    kind: str
    template: str

    @property
    def choices(self) -> tuple[str, ...]:
        """Possible answers of this question form (chance = 1 / len)."""
        return answer_space(self.template, self.text)


def answer_space(template: str, text: str = "") -> tuple[str, ...]:
    if template == "color_of_class":
        return COLOR_NAMES
    if template == "class_of_color":
        return CLASSES
    if template == "count":
        return tuple(str(i) for i in range(MAX_COUNT + 1))
    if template in ("exist", "closer_yesno"):
        return ("yes", "no")
    if template in ("closer", "farther"):
        return tuple(w for w in text_words(text) if w in COLOR_NAMES)[1:3]
    raise KeyError(template)


def q_color_of_class(cls: str) -> str:
    return f"what color is the {cls}?"


def q_class_of_color(color: str) -> str:
    return f"what is the {color} object?"


def q_count(cls: str) -> str:
    return f"how many {PLURALS[cls]} are there?"


def q_exist(cls: str) -> str:
    return f"is there a {cls} in the room?"


def q_closer(c0: str, c1: str, c2: str) -> str:
    return f"which is closer to the {c0} object, the {c1} one or the {c2} one?"


def q_farther(c0: str, c1: str, c2: str) -> str:
    return f"which is farther from the {c0} object, the {c1} one or the {c2} one?"


def q_closer_yesno(c0: str, c1: str, c2: str) -> str:
    return f"is the {c0} object closer to the {c1} object than to the {c2} object?"


def floor_distance(a, b) -> float:
    """Distance between two objects' centres on the floor plane (xy)."""
    return float(np.linalg.norm(a.center[:2] - b.center[:2]))


def questions_for(info: SceneInfo, seed: int | None = None) -> list[Question]:
    """The fixed question list of a scene (deterministic in ``info`` and ``seed``, default
    ``info.seed``): one counting, two existence, up to two attribute and up to
    ``NUM_RELATION`` relation questions (5.9 per scene on average over the first 2,000 test scenes)."""
    rng = _rng(info.seed if seed is None else seed, 2)
    objs = info.objects
    out: list[Question] = []

    # counting / existence: the planned classes (balanced by construction)
    out.append(Question(q_count(info.count_class), str(info.count(info.count_class)), "counting", "count"))
    for c in info.exist_classes:
        out.append(Question(q_exist(c), "yes" if info.count(c) > 0 else "no", "existence", "exist"))

    # attribute: unique class -> colour; unique colour -> class
    unique_cls = [c for c in CLASSES if info.count(c) == 1]
    if unique_cls:
        c = unique_cls[int(rng.integers(len(unique_cls)))]
        o = next(o for o in objs if o.cls == c)
        out.append(Question(q_color_of_class(c), o.color, "attribute", "color_of_class"))
    by_color = {c: [o for o in objs if o.color == c] for c in COLOR_NAMES}
    unique_col = [c for c in COLOR_NAMES if len(by_color[c]) == 1]
    if unique_col:
        c = unique_col[int(rng.integers(len(unique_col)))]
        out.append(Question(q_class_of_color(c), by_color[c][0].cls, "attribute", "class_of_color"))

    # relation: three colour-unique objects, unambiguous distances
    if len(unique_col) >= 3:
        triples = [
            (c0, c1, c2)
            for c0 in unique_col
            for c1, c2 in itertools.combinations([c for c in unique_col if c != c0], 2)
        ]
        order = rng.permutation(len(triples))
        made = 0
        for ti in order:
            if made >= NUM_RELATION:
                break
            c0, c1, c2 = triples[ti]
            if rng.random() < 0.5:
                c1, c2 = c2, c1
            o0, o1, o2 = by_color[c0][0], by_color[c1][0], by_color[c2][0]
            d1, d2 = floor_distance(o0, o1), floor_distance(o0, o2)
            if abs(d1 - d2) < MIN_GAP:
                continue
            form = ("closer", "farther", "closer_yesno")[int(rng.integers(3))]
            if form == "closer":
                q = Question(q_closer(c0, c1, c2), c1 if d1 < d2 else c2, "relation", form)
            elif form == "farther":
                q = Question(q_farther(c0, c1, c2), c1 if d1 > d2 else c2, "relation", form)
            else:
                q = Question(q_closer_yesno(c0, c1, c2), "yes" if d1 < d2 else "no", "relation", form)
            out.append(q)
            made += 1
    return out


# --------------------------------------------------------------------------- vocabulary


def text_words(text: str) -> list[str]:
    """A question text's words, in order, without its punctuation (``PUNCTUATION``)."""
    for mark in PUNCTUATION:
        text = text.replace(mark, " ")
    return text.split()


def all_texts() -> list[str]:
    """Every distinct question text and answer the generator can emit (sorted)."""
    texts = set()
    for c in CLASSES:
        texts |= {q_color_of_class(c), q_count(c), q_exist(c), c}
    for c in COLOR_NAMES:
        texts |= {q_class_of_color(c), c}
    for c0, c1, c2 in itertools.permutations(COLOR_NAMES, 3):
        texts |= {q_closer(c0, c1, c2), q_farther(c0, c1, c2), q_closer_yesno(c0, c1, c2)}
    texts |= {str(i) for i in range(MAX_COUNT + 1)} | {"yes", "no"}
    return sorted(texts)


def _words() -> tuple[str, ...]:
    words = set()
    for t in all_texts():
        words |= set(text_words(t))
    return tuple(sorted(words))


PUNCTUATION = ("?", ",")
WORDS = _words()  # every word in questions and answers (punctuation: PUNCTUATION)
