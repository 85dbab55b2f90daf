"""The model of the Qwen2.5-VL recipe and the loss of one training scene.

The model is transformers' ``Qwen2_5_VLForConditionalGeneration`` at toy size, trained end to end
(tower, merger, decoder). A scene's questions are packed behind one copy of its prompt prefix
(system prompt and the three images) with a block mask, each question's tokens at the M-RoPE
positions it has in its own prompt: the same as separate prompts, several times cheaper. The
prompt, the image patches and the positions are the adapter's own
(``adatoken_compile.models.qwen25vl``), so training sees exactly what ``eval`` feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adatoken_compile.models.llava3d import splice
from adatoken_compile.runtime.positions import LAYOUTS
from adatoken_compile.runtime.prompt import IMAGE_TOKEN_INDEX
from adatoken_compile.runtime.qwen_vision import token_coordinates
from reference_model.targets import (candidate_distance_targets, class_colour_loss, compare_targets, locate_targets,
                                     packed_sequence, qa_targets, read_out_loss, room_frame, weighted_cross_entropy,
                                     word_read_out_at)
from reference_model.text import key_word_ids, key_word_position, word_of_key_token

# min / max pixels of the image processor: the bird's-eye view (336 x 308) is taken as drawn
# (12 x 11 = 132 merged tokens), and so is each 224 x 168 view (48 tokens)
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 336 * 308
NUM_CLASSES, NUM_COLOURS = 5, 6


def build_config(tok, width: int, layers: int, vision_width: int, vision_depth: int, rope_theta: float):
    from transformers import Qwen2_5_VLConfig

    from adatoken_compile.models.testing import qwen25vl_token_ids

    heads = width // 32
    text = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                intermediate_size=3 * width, vocab_size=tok.vocab_size, bos_token_id=None, eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id, max_position_embeddings=4096,
                # head dim 32: 16 rotary pairs, 4 on the time / text axis and 6 each on the image rows and columns
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [4, 6, 6]})
    vision = dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                  num_heads=vision_width // 48, patch_size=14, window_size=112, out_hidden_size=width,
                  fullatt_block_indexes=list(range(1, vision_depth, 2)), spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **qwen25vl_token_ids(tok))


@dataclass
class Vocab:
    tok: object
    class_word: torch.Tensor  # first token of each class word, CLASSES order
    colour_word: torch.Tensor
    key_ids: set
    word_of: dict

    @classmethod
    def of(cls, tok) -> "Vocab":
        from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES

        return cls(tok, torch.tensor([tok.encode(" " + c)[0] for c in CLASSES]),
                   torch.tensor([tok.encode(" " + c)[0] for c in COLOR_NAMES]), key_word_ids(tok), word_of_key_token(tok))


def split_prompt(adapter, question: str, images: int) -> tuple[list[int], list[int]]:
    """(prefix, suffix) of a question's prompt ids: everything up to the last image's end marker,
    which every question about the scene shares, and the rest."""
    ids = adapter.prompt_ids(question, images)
    k = len(ids) - ids[::-1].index(IMAGE_TOKEN_INDEX) + 1  # past the last placeholder and its end marker
    return ids[:k], ids[k:]


@dataclass
class Packed:
    x: torch.Tensor  # (1, L, D)
    allow: torch.Tensor  # (L, L)
    pos: torch.Tensor  # (3, 1, L)
    starts: list
    image_tokens: torch.Tensor  # (N,) positions of the image tokens, in image order
    labels: torch.Tensor
    dense_labels: torch.Tensor
    weight: torch.Tensor  # (L,) loss weight of each position's label (counting questions by answer)
    answer_at: list
    locate: list
    candidate_distance: list
    compare: list


def pack(adapter, vocab: Vocab, feats: list, coords: list, ex, dense: bool, count_w: dict | None = None) -> Packed:
    emb = adapter.vl.model.language_model.embed_tokens
    prefix = None
    blocks, labels, dense_l, answer_at, loc, cand, comp, qw = [], [], [], [], [], [], [], []
    for q in ex.questions:
        qw.append(count_w.get(q.answer, 1.0) if count_w and q.template == "count" else 1.0)
        pre, suf = split_prompt(adapter, q.text, len(feats))
        if prefix is None:
            prefix = pre
        ans = vocab.tok.encode(q.answer) + [vocab.tok.eos_id]
        blocks.append(suf + ans)
        main, extra = qa_targets(len(suf), ans, dense=dense, dense_from=key_word_position(suf, vocab.key_ids))
        labels.append(main)
        dense_l.append(extra)
        answer_at.append(len(suf) - 1)
        loc.append(locate_targets(suf, vocab.word_of, ex.info))
        cand.append(candidate_distance_targets(suf, vocab.word_of, ex.info, q.template))
        comp.append(compare_targets(suf, vocab.word_of, ex.info, q.template))
    seg = splice(prefix, lambda ids: emb(torch.tensor(ids)), list(zip(feats, coords)))
    P = seg.embeds.shape[0]
    allow, _, starts = packed_sequence([0] * P, 0, blocks)
    pre_pos = LAYOUTS["mrope"].prefill(np.ones((1, P)), seg.spatial.numpy()[None], seg.xyz.numpy()[None])
    first = int(pre_pos.max()) + 1  # text after the last image continues past its rows and columns
    L = allow.shape[0]
    pos = torch.empty(3, 1, L, dtype=torch.long)
    pos[:, :, :P] = torch.from_numpy(pre_pos)
    for s, b in zip(starts, blocks):
        pos[:, 0, s : s + len(b)] = torch.arange(first, first + len(b))
    ids = torch.tensor([t for b in blocks for t in b])
    x = torch.cat([seg.embeds, emb(ids)])[None]
    lab = torch.full((L,), -100, dtype=torch.long)
    dlab = torch.full((L,), -100, dtype=torch.long)
    weight = torch.ones(L)
    for s, m, d, qwt in zip(starts, labels, dense_l, qw):
        lab[s : s + len(m)] = torch.tensor(m)
        dlab[s : s + len(d)] = torch.tensor(d)
        weight[s : s + len(m)] = qwt
    return Packed(x, allow, pos, starts, torch.nonzero(seg.spatial).squeeze(1), lab, dlab, weight, answer_at, loc,
                  cand, comp)


def image_features(adapter, ex) -> tuple[list, list]:
    """Per image, its merged tokens (with gradients) and their (t, h, w)."""
    pix = torch.from_numpy(np.concatenate(ex.patches))
    grids = torch.from_numpy(np.stack(ex.grids))
    feats = adapter.vl.model.get_image_features(pix, grids).pooler_output
    m = adapter.processing.merge_size
    return list(feats), [torch.from_numpy(token_coordinates(g, m)) for g in ex.grids]


@dataclass
class Weights:
    dense: float = 1.0
    aux: float = 1.0
    token_label: float = 1.0
    position: float = 1.0
    locate: float = 1.0
    candidate_distance: float = 4.0
    compare: float = 1.0
    locate_layer: int = 2
    candidate_distance_layer: int = 4
    compare_layer: int = 5


def make_heads(width: int, w: Weights) -> dict:
    dims = {"token_label": 1 + NUM_CLASSES + 1 + NUM_COLOURS, "position": 2, "locate": 2, "candidate_distance": 1,
            "compare": 1}
    return {k: nn.Linear(width, d) for k, d in dims.items() if getattr(w, k)}


def token_label_loss(head, feats: torch.Tensor, cls_t: torch.Tensor, col_t: torch.Tensor, object_weight: float = 1.0):
    """Cross-entropy of each merged token's class and colour (room tokens: "none", label 0) from
    ``head`` on the tokens as they enter the decoder; object tokens weigh ``object_weight``.
    Returns (loss, class accuracy over object tokens)."""
    f = head(feats)
    w = torch.where(cls_t >= 0, object_weight, 1.0)
    ce = nn.functional.cross_entropy(f[:, : 1 + NUM_CLASSES], cls_t + 1, reduction="none") + \
        nn.functional.cross_entropy(f[:, 1 + NUM_CLASSES :], col_t + 1, reduction="none")
    obj = cls_t >= 0
    with torch.no_grad():
        acc = (f[obj, 1 : 1 + NUM_CLASSES].argmax(-1) == cls_t[obj]).float().mean().item() if obj.any() else 1.0
    return (ce * w).sum() / w.sum(), acc


def keep_room_share(feats: list, coords: list, ex, share: float, rng: np.random.Generator):
    """Every object token and a random ``share`` of the room tokens (floor, walls, outside the
    room) of each image, each kept token at its own (t, h, w); ``ex``'s token labels and
    bird's-eye positions cut alike. Room tokens are most of an image and answer no question: few
    of them early let the question words find the objects among few tokens."""
    keep = (ex.token_class >= 0) | (rng.random(len(ex.token_class)) < share)
    starts = np.cumsum([0] + [len(f) for f in feats])
    keep[starts[:-1]] = True  # every image keeps a token (its placeholder is never empty)
    keep = torch.from_numpy(keep)
    out_f = [f[keep[a:b]] for f, a, b in zip(feats, starts[:-1], starts[1:])]
    out_c = [c[keep[a:b]] for c, a, b in zip(coords, starts[:-1], starts[1:])]
    n = len(ex.top_xy)
    ex.top_xy = ex.top_xy[keep[:n].numpy()]
    ex.token_class, ex.token_colour = ex.token_class[keep.numpy()], ex.token_colour[keep.numpy()]
    return out_f, out_c


def scene_loss(adapter, vocab: Vocab, heads: dict, ex, w: Weights, log: dict, count_w: dict | None = None,
               room_share: float | None = None, rng: np.random.Generator | None = None):
    """The training loss of one scene; appends its figures to ``log`` (lists by name).
    ``count_w``: loss weight of a counting question by its answer
    (``reference_model.scenes.count_answer_weights``); ``room_share``: keep only that share of
    the room tokens (``keep_room_share``, drawn from ``rng``)."""
    feats, coords = image_features(adapter, ex)
    if room_share is not None:
        feats, coords = keep_room_share(feats, coords, ex, room_share, rng)
    p = pack(adapter, vocab, feats, coords, ex, dense=bool(w.dense), count_w=count_w)
    lm = adapter.vl.model.language_model
    out = lm(inputs_embeds=p.x, attention_mask={"full_attention": p.allow[None, None]}, position_ids=p.pos,
             output_hidden_states=True)
    logits = adapter.vl.lm_head(out.last_hidden_state[0])
    total = weighted_cross_entropy(logits, p.labels, p.weight)
    if w.dense:
        total = total + w.dense * weighted_cross_entropy(logits, p.dense_labels, p.weight)
    hs = out.hidden_states
    for name, at in (("locate", word_read_out_at(p.starts, p.locate)),
                     ("candidate_distance", word_read_out_at(p.starts, p.candidate_distance)),
                     ("compare", word_read_out_at(p.starts, p.compare))):
        if name in heads and at:
            layer = min(getattr(w, f"{name}_layer"), len(hs) - 1)  # a smaller decoder: its last layer
            total = total + getattr(w, name) * read_out_loss(hs, layer, heads[name], at,
                                                             log.setdefault(name, []), binary=name == "compare")
    cls_t, col_t = torch.from_numpy(ex.token_class), torch.from_numpy(ex.token_colour)
    obj = cls_t >= 0
    if w.aux and obj.any():
        # each object token names its class and colour (a dense caption of the images)
        sl = logits[p.image_tokens][obj]
        total = total + w.aux * class_colour_loss(sl, sl, vocab.class_word[cls_t[obj]], vocab.colour_word[col_t[obj]])
    if "token_label" in heads:
        # the tower's own read-out: each merged token, as it enters the decoder, names its class and
        # colour (room tokens: "none"), stage 1's labels kept on while the decoder trains
        lab, acc = token_label_loss(heads["token_label"], torch.cat(feats), cls_t, col_t)
        total = total + w.token_label * lab
        log.setdefault("token_class_acc", []).append(acc)
    if "position" in heads:
        n = len(ex.top_xy)  # the bird's-eye view's tokens, as they enter the decoder
        target = room_frame(torch.from_numpy(ex.top_xy), torch.as_tensor(np.asarray(ex.info.room[:2], np.float32)))
        err = nn.functional.mse_loss(heads["position"](feats[0][:n]), target)
        total = total + w.position * err
        log.setdefault("position", []).append(err.item())
    with torch.no_grad():
        first = torch.tensor(p.starts) + torch.tensor(p.answer_at)
        log.setdefault("answer_ce", []).append(
            nn.functional.cross_entropy(logits[first], p.labels[first]).item())
        log.setdefault("hits", []).append((logits[first].argmax(-1) == p.labels[first]).sum().item())
        log.setdefault("questions", []).append(len(p.starts))
    return total
