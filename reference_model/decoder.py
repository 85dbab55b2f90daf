"""Stage 2, the decoder stage: the trainable part of LLaVA-3D (3D position embedding, projector,
Llama decoder) and the training-only read-out heads, and the loss of one training scene.

A scene goes through exactly the adapter's path (preprocessing, unprojection, voxel pooling,
llava_v1 prompt, splice). All questions of the scene are packed into one sequence behind one copy
of its tokens, with a block attention mask and per-question position ids: mathematically the same
as separate sequences, several times cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from adatoken_compile.runtime.scene import voxelize
from reference_model.config import DECODER, VISION, VISION_PATCHES, LossConfig, TrainConfig
from reference_model.progress import Metrics
from reference_model.scenes import ROOM_LABELS
from reference_model.schedule import StepPlan, room_keep_share
from reference_model.targets import (balanced_bce, candidate_distance_targets, class_colour_loss, compare_targets,
                                     distance_targets, instance_markers, locate_targets, object_targets,
                                     packed_sequence, position_targets, qa_targets, read_out_loss, voxel_majority,
                                     weighted_cross_entropy, word_read_out_at)
from reference_model.text import Vocabulary, key_word_position, prompt_ids

# training-only heads (not saved) in the order they are created, with their output sizes
HEAD_DIMS = {"locate": 2, "instance": 1, "position": 3, "distance": 2, "candidate_distance": 1, "compare": 1}


@dataclass
class Stage2Modules:
    lm: nn.Module
    pe: nn.Module
    proj: nn.Module
    heads: dict[str, nn.Linear]  # the heads whose loss weight is on
    params: list  # what the optimiser trains, in a fixed order


def head_weights(loss: LossConfig) -> dict[str, float]:
    """Loss weight of each training-only head (0: the head is not created)."""
    return {"position": loss.position_weight, **{k: r.weight for k, r in loss.read_outs().items()}}


def build_stage2(tok, cfg: TrainConfig) -> Stage2Modules:
    from transformers import LlamaConfig, LlamaForCausalLM

    from adatoken_compile.models.llava3d import PositionEmbedding3D, build_projector

    torch.manual_seed(cfg.stage2_seed + 1)  # same decoder init whether stage 1 ran or came from the cache
    # rope_theta: with head_dim 32 and theta 1e4 only ~3 of 16 rotary pairs stay nearly constant
    # across the ~1,500 positions between a question and a scene token, so content look-ups have
    # few dimensions to work with; theta 1e6 (as in Llama 3 / Qwen2 style configs) leaves about half
    dcfg = LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, rope_theta=cfg.decoder.rope_theta, **DECODER)
    dcfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(dcfg)
    # text embeddings start at the scale of the projected spatial tokens (norm ~3 for hidden 128)
    # instead of HF's std 0.02 (norm ~0.2), so question words are not drowned by ~1,400 scene tokens
    nn.init.normal_(lm.model.embed_tokens.weight, std=cfg.decoder.embed_std)
    pe = PositionEmbedding3D(3, VISION["hidden_size"])
    if cfg.decoder.pe_scale != 1.0:
        # the CLIP features the position embedding is added to have norm ~41, a default-initialised
        # embedding ends training at ~4.4: a larger start makes a token's position more readable
        with torch.no_grad():
            pe.position_embedding_head[-1].weight.mul_(cfg.decoder.pe_scale)
            pe.position_embedding_head[-1].bias.mul_(cfg.decoder.pe_scale)
    proj = build_projector("mlp2x_gelu", VISION["hidden_size"], DECODER["hidden_size"], "train")
    params = list(lm.parameters()) + list(pe.parameters()) + list(proj.parameters())
    heads, weights = {}, head_weights(cfg.loss)
    for name, dim in HEAD_DIMS.items():
        if weights[name]:
            heads[name] = nn.Linear(DECODER["hidden_size"], dim)
            params += list(heads[name].parameters())
    return Stage2Modules(lm, pe, proj, heads, params)


@dataclass
class SceneTokens:
    """A scene's voxel tokens as one step sees them, with their majority labels."""

    pooled: torch.Tensor  # (N, Dv) voxel means of tower features + 3D position embedding
    classes: torch.Tensor  # majority class label
    colours: torch.Tensor  # majority colour label
    instances: torch.Tensor | None  # majority instance, -1 for the room (None: not asked for)
    centres: torch.Tensor  # voxel centres (N, 3)


def _view_subset(f, xyz, pcls, pcol, pinst, views: int, seed: int):
    """Only ``views`` (seeded random) views of a scene, for --curriculum-views: fewer tokens make
    the attention's first look-ups easier to find."""
    V = len(f) // VISION_PATCHES
    chosen = np.random.default_rng(seed).choice(V, size=min(views, V), replace=False)
    rows = (chosen[:, None] * VISION_PATCHES + np.arange(VISION_PATCHES)[None]).reshape(-1)
    return f[rows], xyz[rows], pcls[rows], pcol[rows], None if pinst is None else pinst[rows], voxelize(xyz[rows].numpy())


def scene_tokens(entry, pe: nn.Module, step: int, cfg: TrainConfig, plan: StepPlan) -> SceneTokens:
    """The voxel tokens of a scene entry (``scenes.scene_entry``) at ``step``: through the trainable
    position embedding, pooled per voxel, with the curricula's views and room share."""
    (f, xyz, vmap), _, (pcls, pcol, pinst) = entry
    seed = cfg.stage2_seed
    if cfg.schedule.curriculum_views and step < plan.curriculum:
        f, xyz, pcls, pcol, pinst, vmap = _view_subset(f, xyz, pcls, pcol, pinst, cfg.schedule.curriculum_views,
                                                       seed * 7919 + step)
    v = f + pe(xyz)
    inv, n = torch.from_numpy(vmap.inverse), vmap.num_tokens
    pooled = torch.zeros(n, v.shape[1]).index_add(0, inv, v) / torch.bincount(inv, minlength=n)[:, None].float()
    vc, vk = voxel_majority(pcls, inv, n), voxel_majority(pcol, inv, n)
    vi = None if pinst is None else voxel_majority(pinst, inv, n) - 1
    centres = torch.from_numpy(vmap.centers)
    keep_p = room_keep_share(step, plan.bg, plan.hold, cfg.schedule.bg_keep_max)
    if keep_p is not None:  # every object voxel, a random share of the room's
        rnd = torch.from_numpy(np.random.default_rng(seed * 104729 + step).random(n))
        sel = (vc >= ROOM_LABELS) | (rnd < keep_p)
        pooled, vc, vk, centres = pooled[sel], vc[sel], vk[sel], centres[sel]
        vi = None if vi is None else vi[sel]
    return SceneTokens(pooled, vc, vk, vi, centres)


@dataclass
class QuestionBlocks:
    """Per question of a scene: its block of token ids ("\\n{q} ASSISTANT:" + " {a}" + EOS), its
    (answer, dense) labels, the block offset whose label is the answer's first token, its loss
    weight, and the targets of the read-outs at its words (offset in the block, target)."""

    ids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    answer_at: list = field(default_factory=list)
    weight: list = field(default_factory=list)
    locate: list = field(default_factory=list)
    distance: list = field(default_factory=list)  # (d1, d2) or None, read at answer_at
    candidate_distance: list = field(default_factory=list)
    compare: list = field(default_factory=list)


def question_blocks(qs, vocab: Vocabulary, info, loss: LossConfig, count_w: dict | None) -> QuestionBlocks:
    b = QuestionBlocks()
    tok, word_of = vocab.tok, vocab.word_of
    for q in qs:
        b.weight.append(count_w.get(q.answer, 1.0) if count_w and q.template == "count" else 1.0)
        suffix = prompt_ids(tok, q.text)[1]
        ans = tok.encode(" " + q.answer) + [tok.eos_id]
        b.ids.append(suffix + ans)
        b.labels.append(qa_targets(len(suffix), ans, dense=bool(loss.dense_answer),
                                   dense_from=key_word_position(suffix, vocab.key_ids) if loss.dense_from == "key-word" else 2))
        b.answer_at.append(len(suffix) - 1)
        b.locate.append(locate_targets(suffix, word_of, info) if loss.locate.weight else [])
        b.distance.append(distance_targets(suffix, word_of, info, q.template) if loss.distance.weight else None)
        b.candidate_distance.append(candidate_distance_targets(suffix, word_of, info, q.template)
                                    if loss.candidate_distance.weight else [])
        b.compare.append(compare_targets(suffix, word_of, info, q.template) if loss.compare.weight else [])
    return b


@dataclass
class Packed:
    """One scene's packed sequence: [prefix][spatial][q1 a1]...[qk ak] and its labels."""

    x: torch.Tensor  # (1, L, D) input embeddings
    allow: torch.Tensor  # (L, L) block-causal mask
    pos: torch.Tensor  # (L,) position ids
    starts: list[int]  # start of each question block
    labels: torch.Tensor  # (L,) label at position p = token p+1, -100 ignored
    dense_labels: torch.Tensor
    pos_weight: torch.Tensor  # (L,) loss weight of each position's label
    spatial: slice  # the scene tokens' positions


def pack(emb: nn.Module, prefix_ids: list[int], spatial: torch.Tensor, b: QuestionBlocks) -> Packed:
    allow, pos, starts = packed_sequence(prefix_ids, len(spatial), b.ids)
    x = torch.cat([emb(torch.tensor(prefix_ids)), spatial] + [emb(torch.tensor(s)) for s in b.ids])[None]
    labels = torch.full((x.shape[1],), -100, dtype=torch.long)
    dense_labels = torch.full_like(labels, -100)
    pos_weight = torch.ones(x.shape[1])
    for s, (t, d), w in zip(starts, b.labels, b.weight):
        labels[s : s + len(t)] = torch.tensor(t)
        dense_labels[s : s + len(d)] = torch.tensor(d)
        pos_weight[s : s + len(t)] = w
    return Packed(x, allow, pos, starts, labels, dense_labels, pos_weight,
                  slice(len(prefix_ids), len(prefix_ids) + len(spatial)))


def _answer_loss(logits, p: Packed, loss: LossConfig, weighted: bool) -> torch.Tensor:
    """Next-token loss on the answers (and, with --dense-answer, at the question positions)."""
    if weighted:
        out = weighted_cross_entropy(logits, p.labels, p.pos_weight)
        if loss.dense_answer:
            out = out + loss.dense_answer * weighted_cross_entropy(logits, p.dense_labels, p.pos_weight)
        return out
    # the unweighted path keeps the plain mean, so that commands without --count-balance reproduce bit for bit
    out = nn.functional.cross_entropy(logits, p.labels, ignore_index=-100)
    if loss.dense_answer:
        out = out + loss.dense_answer * nn.functional.cross_entropy(logits, p.dense_labels, ignore_index=-100)
    return out


def _question_read_outs(total, hidden_states, p: Packed, b: QuestionBlocks, m: Stage2Modules, loss: LossConfig,
                        metrics: Metrics) -> torch.Tensor:
    """``total`` plus the losses of the read-outs at question positions that have targets here."""
    at = {"locate": word_read_out_at(p.starts, b.locate),
          "distance": [(s + a, d) for s, a, d in zip(p.starts, b.answer_at, b.distance) if d is not None],
          "candidate_distance": word_read_out_at(p.starts, b.candidate_distance),
          "compare": word_read_out_at(p.starts, b.compare)}
    for name, targets in at.items():
        if targets:
            r = getattr(loss, name)
            total = total + r.weight * read_out_loss(hidden_states, r.layer, m.heads[name], targets,
                                                     metrics.read_outs[name], binary=name == "compare")
    return total


def _scene_token_losses(total, out, spatial, t: SceneTokens, info, p: Packed, m: Stage2Modules, vocab: Vocabulary,
                        loss: LossConfig, metrics: Metrics) -> torch.Tensor:
    """``total`` plus the losses on the scene tokens: position read-out, instance markers, and the
    class / colour words of object tokens (after the decoder: --aux-weight; before it: --align-weight)."""
    if "position" in m.heads:
        pos_err = nn.functional.mse_loss(m.heads["position"](spatial), position_targets(t.centres, info.room))
        total = total + loss.position_weight * pos_err
        metrics.read_outs["position"].append(pos_err.item())
    obj, cls_t, col_t = object_targets(t.classes, t.colours)
    on, mark = instance_markers(t.classes, t.instances) if "instance" in m.heads else (None, None)
    if on is not None and on.any():  # (a voxel can vote object by class but room by instance)
        sc = m.heads["instance"](out.hidden_states[loss.instance.layer][0, p.spatial][on]).squeeze(1)
        total = total + loss.instance.weight * balanced_bce(sc, mark)
        with torch.no_grad():
            metrics.read_outs["instance"].append(0.5 * (((sc > 0) & mark).sum() / mark.sum().clamp(min=1)
                                                        + ((sc <= 0) & ~mark).sum() / (~mark).sum().clamp(min=1)).item())
    if loss.aux_weight > 0 and obj.any():
        # a "dense caption" of the scene tokens, like LLaVA's alignment stage: at each object token
        # its class and colour words (majority over the voxel's patches)
        sl = out.logits[0][p.spatial][obj]
        col_words = torch.where(col_t >= 0, vocab.colour_word[col_t.clamp(min=0)], -1)
        total = total + loss.aux_weight * class_colour_loss(sl, sl, vocab.class_word[cls_t], col_words)
    if loss.align_weight > 0 and obj.any():
        # an object token must score highest, by dot product, with the input embeddings of its class
        # and colour words, so "ball" in a question can find ball voxels by a layer-0 match of like
        # with like instead of a look-up learned from scratch
        s_obj, emb = spatial[obj], m.lm.get_input_embeddings()
        total = total + loss.align_weight * class_colour_loss(s_obj @ emb.weight[vocab.class_word].T,
                                                              s_obj @ emb.weight[vocab.colour_word].T, cls_t, col_t)
    return total


def scene_loss(m: Stage2Modules, vocab: Vocabulary, t: SceneTokens, b: QuestionBlocks, info, loss: LossConfig,
               weighted: bool, metrics: Metrics):
    """The training loss of one scene, and (logits, packed sequence) for the accuracy figures."""
    spatial = m.proj(t.pooled)
    p = pack(m.lm.get_input_embeddings(), vocab.prefix_ids, spatial, b)
    out = m.lm(inputs_embeds=p.x, attention_mask=p.allow[None, None], position_ids=p.pos[None],
               output_hidden_states=any(k != "position" for k in m.heads))
    logits = out.logits[0]
    total = _answer_loss(logits, p, loss, weighted)
    total = _question_read_outs(total, out.hidden_states, p, b, m, loss, metrics)
    total = _scene_token_losses(total, out, spatial, t, info, p, m, vocab, loss, metrics)
    return total, logits, p


@torch.no_grad()
def record_answers(metrics: Metrics, logits, p: Packed, b: QuestionBlocks) -> None:
    """The first answer token, predicted at each question's last position, and the dense targets:
    how many are right."""
    first = torch.tensor(p.starts) + torch.tensor(b.answer_at)
    metrics.hits.append((logits[first].argmax(-1) == p.labels[first]).sum().item())
    metrics.questions.append(len(b.ids))
    dm = p.dense_labels != -100
    metrics.dense_hits.append((logits[dm].argmax(-1) == p.dense_labels[dm]).sum().item())
    metrics.dense_targets.append(int(dm.sum()))
