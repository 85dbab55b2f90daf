"""Stage 2's targets and losses: the packed question sequence, the answer labels, the voxel labels
of the scene tokens, and the training-only read-outs (their targets at given positions, their
losses). Pure functions of tensors and lists, so each can be tested on hand-made inputs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reference_model.scenes import ROOM_LABELS

def packed_sequence(prefix_ids, n_spatial, qa_ids):
    """Layout [prefix][spatial][q1 a1]...[qk ak] with a block-causal mask.

    Returns (text_ids_list, allow (L,L) bool, position ids (L,), segment starts).
    """
    P = len(prefix_ids) + n_spatial
    L = P + sum(len(q) for q in qa_ids)
    allow = torch.zeros(L, L, dtype=torch.bool)
    allow[:P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
    pos = torch.empty(L, dtype=torch.long)
    pos[:P] = torch.arange(P)
    starts, s = [], P
    for q in qa_ids:
        n = len(q)
        allow[s : s + n, :P] = True
        allow[s : s + n, s : s + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        pos[s : s + n] = torch.arange(P, P + n)
        starts.append(s)
        s += n
    return allow, pos, starts


def voxel_majority(patch_labels: torch.Tensor, inverse: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """Per voxel, the most frequent label among its patches (``inverse``: patch -> voxel index);
    ties go to the smaller label."""
    votes = torch.zeros(num_voxels, int(patch_labels.max()) + 1)
    votes.index_add_(0, inverse, nn.functional.one_hot(patch_labels).float())
    return votes.argmax(1)


def object_targets(vc: torch.Tensor, vk: torch.Tensor):
    """Object voxels (majority class label >= ROOM_LABELS) with their class index and colour index
    (-1 where the colour vote tied with the room's "no colour" and went to the room)."""
    obj = vc >= ROOM_LABELS
    return obj, vc[obj] - ROOM_LABELS, vk[obj] - 1


def instance_markers(vc: torch.Tensor, vi: torch.Tensor):
    """The --instance-weight targets of a scene's voxel tokens: ``on`` = object voxels (majority
    class an object, majority instance an object) and, over those, ``mark`` = first token of its
    instance. Over 40 training scenes, the markers of a class equal its count in 194 of 200
    (scene, class) pairs (a fully hidden object is missed, a mixed voxel adds one)."""
    on = (vc >= ROOM_LABELS) & (vi >= 0)
    return on, first_of_instance(torch.where(on, vi, -1))[on]


def first_of_instance(voxel_instance: torch.Tensor) -> torch.Tensor:
    """True at the first token (in sequence order) of each object instance; ``voxel_instance``
    holds a voxel's majority instance id, -1 for room voxels. One marker per object whatever its
    size, so "how many chairs" becomes "how many chair markers": a number of tokens with a sharp
    feature, which attention against a fixed sink (the prefix) can turn into a share that grows
    with the count -- unlike voxel shares, which follow the objects' sizes."""
    out = torch.zeros(len(voxel_instance), dtype=torch.bool)
    ids = voxel_instance[voxel_instance >= 0]
    if len(ids):
        where = torch.nonzero(voxel_instance >= 0).squeeze(1)
        uniq, inv = torch.unique(ids, return_inverse=True)
        first = torch.full((len(uniq),), len(voxel_instance), dtype=torch.long).scatter_reduce(0, inv, where, "amin")
        out[first] = True
    return out


def balanced_bce(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the positives and the negatives each averaged on their own, then
    the two means averaged: a rare positive class (a few markers among hundreds of voxels) weighs
    as much as the rest, so "never" is not a cheap answer."""
    ce = nn.functional.binary_cross_entropy_with_logits(scores, target.float(), reduction="none")
    parts = [ce[m].mean() for m in (target, ~target) if m.any()]
    return sum(parts) / len(parts)


def class_colour_loss(cls_scores, col_scores, cls_t, col_t) -> torch.Tensor:
    """Mean of the class and the colour cross-entropy over object voxels; a voxel without a colour
    target (``col_t`` < 0) counts for the class only."""
    has = col_t >= 0
    col = nn.functional.cross_entropy(col_scores[has], col_t[has]) if has.any() else cls_scores.new_zeros(())
    return 0.5 * (nn.functional.cross_entropy(cls_scores, cls_t) + col)


def qa_targets(suffix_len: int, answer_ids: list[int], dense: bool = False, dense_from: int = 2):
    """Labels of one packed question block ``suffix + answer`` (label at p = token p+1): the
    answer tokens and EOS after the last suffix token; with ``dense`` also a second label row
    where every question position from ``dense_from`` on predicts the answer's first token (deep
    supervision: a scene look-up can then be learned at the question word, one hop, before the
    final position learns to gather it). The default 2 skips "\n" and the first word, which carry
    no question yet; ``key_word_position`` gives the first position where the question text
    determines its answer. Returns (labels, dense_labels), -100 = ignored."""
    n = suffix_len + len(answer_ids)
    main = [-100] * (suffix_len - 1) + list(answer_ids) + [-100]
    extra = [-100] * n
    if dense:
        for p in range(max(2, dense_from), suffix_len - 1):
            extra[p] = answer_ids[0]
    return main, extra


def weighted_cross_entropy(logits, labels, weight) -> torch.Tensor:
    """Cross-entropy averaged over the labelled positions (label != -100) with a weight per
    position: sum(w * ce) / sum(w); equal weights give the plain mean."""
    m = labels != -100
    if not m.any():
        return logits.new_zeros(())
    ce = nn.functional.cross_entropy(logits[m], labels[m], reduction="none")
    return (ce * weight[m]).sum() / weight[m].sum()


def room_frame(p, room):
    """Positions in metres from the room's centre, halved (about -2..2 on the floor plane): the
    targets of both position read-outs (``room`` the extents, of p's type and length)."""
    return (p - room / 2) / 2


def locate_targets(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info) -> list[tuple[int, tuple[float, float]]]:
    """(position, floor position) for every class / colour word of a question that names exactly
    one object of the scene: the object's centre on the floor plane (``room_frame``). A relation
    question ("which is closer to the red object, the blue one or the green one?") names three
    colour-unique objects; supervising where each is at its word gives the distance comparison its
    inputs one hop early."""
    out = []
    for i, t in enumerate(suffix_ids):
        if t not in word_of:
            continue
        what, name = word_of[t]
        objs = [o for o in info.objects if (o.cls if what == "class" else o.color) == name]
        if len(objs) == 1:
            xy = room_frame(objs[0].center[:2], np.asarray(info.room[:2]))
            out.append((i, (float(xy[0]), float(xy[1]))))
    return out


def position_targets(centres: torch.Tensor, room) -> torch.Tensor:
    """--position-weight's targets: voxel centres (N, 3) in the frame of ``room_frame``."""
    return room_frame(centres.float(), torch.as_tensor(np.asarray(room, np.float32)))


RELATION_TEMPLATES = ("closer", "farther", "closer_yesno")


def relation_objects(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info, template: str):
    """For a relation question ("which is closer to the red object, the blue one or the green one?";
    every relation template names c0, c1, c2 in that order): [(position of the colour word, object)]
    for the three colour-unique objects it names; None for other questions."""
    if template not in RELATION_TEMPLATES:
        return None
    words = [(i, word_of[t][1]) for i, t in enumerate(suffix_ids) if t in word_of and word_of[t][0] == "colour"]
    named = [(i, [o for o in info.objects if o.color == c]) for i, c in words]
    if len(named) != 3 or any(len(o) != 1 for _, o in named):
        return None  # relation questions name three colour-unique objects; anything else is not one
    return [(i, o[0]) for i, o in named]


def distance_targets(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info, template: str):
    """--distance-weight's target for a relation question ("which is closer to the red object, the
    blue one or the green one?"): the floor distances (red, blue) and (red, green), in the units of
    ``room_frame`` (metres, halved), in the order the question names them; None for other questions."""
    from adatoken_compile.benchmark3d.questions import floor_distance

    named = relation_objects(suffix_ids, word_of, info, template)
    if named is None:
        return None
    (_, o0), (_, o1), (_, o2) = named
    return (0.5 * floor_distance(o0, o1), 0.5 * floor_distance(o0, o2))


def candidate_distance_targets(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info,
                               template: str) -> list[tuple[int, float]]:
    """--candidate-distance-weight's targets for a relation question: at each candidate's colour word
    (blue, green in "which is closer to the red object, the blue one or the green one?") its floor
    distance to the reference object (red), in the units of ``room_frame``; [] for other questions.
    Each hop of the comparison is then supervised where it happens (the reference's position is
    known by the candidate words, which the answer only has to compare); the read-out at the last
    position (--distance-weight) asks for both hops at once and is not learnt (MODEL_CARD.md;
    experiments/relation_toy.py measures the two on a toy of this comparison)."""
    from adatoken_compile.benchmark3d.questions import floor_distance

    named = relation_objects(suffix_ids, word_of, info, template)
    if named is None:
        return []
    (_, o0), *cands = named
    return [(i, 0.5 * floor_distance(o0, o)) for i, o in cands]


def compare_targets(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info,
                    template: str) -> list[tuple[int, float]]:
    """--compare-weight's target for a relation question: at the second candidate's colour word
    (green in "which is closer to the red object, the blue one or the green one?") 1.0 if the first
    candidate is the closer one (d(red, blue) < d(red, green)), else 0.0; [] for other questions.
    The candidate-distance read-out gives each candidate word its own distance; this supervises the
    one step left, the comparison, where both distances are one hop apart: with only the distances
    supervised, the answer names a candidate every time but picks it at chance."""
    from adatoken_compile.benchmark3d.questions import floor_distance

    named = relation_objects(suffix_ids, word_of, info, template)
    if named is None:
        return []
    (_, o0), (_, o1), (i2, o2) = named
    return [(i2, 1.0 if floor_distance(o0, o1) < floor_distance(o0, o2) else 0.0)]


def word_read_out_at(starts: list[int], per_question: list[list]) -> list:
    """The packed sequence's (position, target) pairs of a read-out whose targets are given per
    question as (offset in the question's block, target): block start + offset."""
    return [(s + i, t) for s, targets in zip(starts, per_question) for i, t in targets]


def read_out_loss(hidden_states, layer: int, head: nn.Module, at: list, errors: list,
                  binary: bool = False) -> torch.Tensor:
    """Loss of a training-only linear read-out: ``head`` applied to the hidden state after decoder
    layer ``layer`` at the positions of ``at`` = [(position, target), ...], against the targets:
    MSE, its value appended to ``errors`` (the log's rms); or with ``binary`` logistic (targets 0/1),
    the share of correct signs appended (the log's accuracy)."""
    pred = head(hidden_states[layer][0, torch.tensor([a for a, _ in at])])
    target = torch.tensor([t for _, t in at]).reshape(pred.shape)
    if binary:
        err = nn.functional.binary_cross_entropy_with_logits(pred, target)
        errors.append(((pred > 0).float() == target).float().mean().item())
        return err
    err = nn.functional.mse_loss(pred, target)
    errors.append(err.item())
    return err
