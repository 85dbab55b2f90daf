"""``python -m reference_model.qwen.train``: train `qwen25vl-tiny` and write its checkpoint.

One run: build the checkpoint's tokenizer and a random model, train it end to end on training
scenes (one scene a step, all its questions packed), save it with the files the adapter reads,
and record the command, settings, cost and the CI-sample accuracy in ``TRAINING.json``.
Seeded: the same command, torch version and ``--threads`` give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch

from reference_model.qwen.data import qwen_tokenizer, scene_example
from reference_model.qwen.model import (MAX_PIXELS, MIN_PIXELS, Vocab, Weights, build_config, make_heads,
                                        scene_loss)
from reference_model.schedule import lr_factor, room_keep_share

WARMUP = 100


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m reference_model.qwen.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if this tool wrote it")
    ap.add_argument("--seed", type=int, default=0, help="model init, scene order")
    ap.add_argument("--scenes", type=int, default=2000, help="training scenes (train seeds 0..N-1)")
    ap.add_argument("--steps", type=int, default=4000, help="optimizer steps, one scene each")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop after this many minutes of training (the rate schedule follows --steps)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-decay-frac", type=float, default=0.2, help="cosine decay over this last share of the steps")
    ap.add_argument("--width", type=int, default=128, help="decoder width (heads of 32)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vision-width", type=int, default=96, help="tower width (heads of 48)")
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--embed-std", type=float, default=0.3, help="text embedding init std")
    ap.add_argument("--relation-draws", type=int, default=12)
    ap.add_argument("--relations-first", type=float, default=0.0,
                    help="share of the steps that train only class_of_color and the relation templates")
    ap.add_argument("--room-curriculum", type=float, default=0.0,
                    help="share of the steps over which the room tokens are phased in from none to "
                         "--room-keep (object tokens always kept)")
    ap.add_argument("--room-hold", type=float, default=0.0,
                    help="then --room-keep of them until this share of the steps; whole images after")
    ap.add_argument("--room-keep", type=float, default=1.0)
    ap.add_argument("--views-from", type=float, default=0.0,
                    help="share of the steps that see the bird's-eye view alone (then all three images)")
    for name, default in vars(Weights()).items():
        ap.add_argument(f"--{name.replace('_', '-')}" + ("" if name.endswith("layer") else "-weight"),
                        dest=name, type=type(default), default=default)
    ap.add_argument("--count-balance", action="store_true",
                    help="weigh counting questions so every answer 0-4 carries the same total (the evaluation asks "
                         "each about equally often; random rooms hold most classes 0 or 1 times)")
    ap.add_argument("--tower-steps", type=int, default=0,
                    help="stage 1: steps that train the tower alone on each merged token's class and colour")
    ap.add_argument("--tower-scenes", type=int, default=400, help="stage 1's scenes (train seeds from 500,000)")
    ap.add_argument("--tower-batch", type=int, default=4, help="stage 1's scenes a step")
    ap.add_argument("--tower-lr", type=float, default=2e-3)
    ap.add_argument("--tower-object-weight", type=float, default=5.0,
                    help="stage 1's weight of object tokens (most tokens show floor, walls or nothing)")
    ap.add_argument("--tower-lr-mult", type=float, default=1.0, help="stage 2's rate of the tower, times --lr")
    ap.add_argument("--tower-cache", default=None,
                    help="file that keeps stage 1's result for its settings: reused by a run with the same ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=100)
    return ap.parse_args(argv)


def build(args, tmp: str):
    """The random checkpoint written to ``tmp`` and loaded through the package's adapter."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from adatoken_compile.models.qwen25vl import Qwen25VLAdapter
    from adatoken_compile.models.testing import save_qwen25vl

    torch.manual_seed(args.seed)
    tok = qwen_tokenizer()
    model = Qwen2_5_VLForConditionalGeneration(build_config(tok, args.width, args.layers, args.vision_width,
                                                            args.vision_depth, args.rope_theta))
    # question words start at the scale of the merged image tokens, not drowned by them
    torch.nn.init.normal_(model.model.language_model.embed_tokens.weight, std=args.embed_std)
    save_qwen25vl(model, tok, tmp, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return tok, Qwen25VLAdapter(tmp)


def steps_templates(args, step: int):
    if step < args.relations_first * args.steps:
        return {"class_of_color", "closer", "farther", "closer_yesno"}
    return None


def first_image(ex) -> None:
    """``ex`` with its bird's-eye view alone (fewer tokens to search while the look-ups form)."""
    n = int(np.prod(ex.grids[0])) // 4  # patches per merged token (2 x 2)
    ex.patches, ex.grids = ex.patches[:1], ex.grids[:1]
    ex.token_class, ex.token_colour = ex.token_class[:n], ex.token_colour[:n]


def train_tower(args, adapter, head) -> dict:
    """Stage 1: the tower (patch embedding, blocks, merger) and ``head`` on the class and colour of
    each merged token of the bird's-eye views of ``--tower-scenes`` scenes (rendered once, kept), a
    batch of ``--tower-batch`` scenes a step, AdamW with a cosine rate. With ``--tower-cache`` a
    result of the same settings is loaded instead."""
    from reference_model.qwen.model import token_label_loss
    from reference_model.scenes import VISION_SEED_OFFSET

    t0 = time.time()
    vis = adapter.vl.model.visual
    key = {k: getattr(args, k) for k in ("seed", "vision_width", "vision_depth", "width", "tower_steps",
                                          "tower_scenes", "tower_batch", "tower_lr", "tower_object_weight")}
    if args.tower_cache and os.path.exists(args.tower_cache):
        saved = torch.load(args.tower_cache, weights_only=False)
        if saved["settings"] == key:
            vis.load_state_dict(saved["tower"])
            head.load_state_dict(saved["head"])
            print(f"stage 1 from {args.tower_cache}", flush=True)
            return {**saved["record"], "cache": args.tower_cache}
    params = list(vis.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.tower_lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed + 2)
    cache: dict = {}
    accs, history = [], []
    for step in range(args.tower_steps):
        seeds = rng.integers(0, args.tower_scenes, args.tower_batch)
        for s in seeds:
            if int(s) not in cache:
                e = scene_example(VISION_SEED_OFFSET + int(s), adapter.processing, 0)
                first_image(e)
                cache[int(s)] = e
        exs = [cache[int(s)] for s in seeds]
        pix = torch.from_numpy(np.concatenate([e.patches[0] for e in exs]))
        grids = torch.from_numpy(np.stack([e.grids[0] for e in exs]))
        feats = torch.cat(list(adapter.vl.model.get_image_features(pix, grids).pooler_output))
        loss, acc = token_label_loss(head, feats, torch.from_numpy(np.concatenate([e.token_class for e in exs])),
                                     torch.from_numpy(np.concatenate([e.token_colour for e in exs])),
                                     args.tower_object_weight)
        for g in opt.param_groups:
            g["lr"] = args.tower_lr * lr_factor(step / args.tower_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        accs.append(acc)
        if (step + 1) % args.log_every == 0 or step + 1 == args.tower_steps:
            row = {"tower_step": step + 1, "min": round((time.time() - t0) / 60, 2),
                   "token_class_acc": float(np.mean(accs))}
            history.append(row)
            print(json.dumps(row), flush=True)
            accs = []
    record = {"steps": args.tower_steps, "minutes": round((time.time() - t0) / 60, 2), "history": history}
    if args.tower_cache:
        torch.save({"settings": key, "tower": vis.state_dict(), "head": head.state_dict(), "record": record},
                   args.tower_cache)
    return record


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tok, adapter = build(args, os.path.join(tmp, "init"))
    vl = adapter.vl.train()
    w = Weights(**{k: getattr(args, k) for k in vars(Weights())})
    torch.manual_seed(args.seed + 1)
    heads = make_heads(args.width, w)
    tower = train_tower(args, adapter, heads["token_label"]) if args.tower_steps and "token_label" in heads else None
    tower_params = list(vl.model.visual.parameters())
    ids = {id(p) for p in tower_params}
    rest = [p for p in vl.parameters() if id(p) not in ids] + [p for h in heads.values() for p in h.parameters()]
    params = tower_params + rest
    # the tower trained by stage 1 learns on at --tower-lr-mult of the rate, keeping what it reads
    groups = [{"params": tower_params, "mult": args.tower_lr_mult}, {"params": rest, "mult": 1.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    vocab = Vocab.of(tok)
    count_w = None
    if args.count_balance:
        from adatoken_compile.benchmark3d.world import make_world
        from reference_model.scenes import count_answer_weights

        count_w = count_answer_weights([make_world(s) for s in range(args.scenes)])
    rng = np.random.default_rng(args.seed)
    room_rng = np.random.default_rng(args.seed + 3)
    order: list[int] = []
    log: dict = {}
    history = []
    step = 0
    while step < args.steps:
        if args.minutes is not None and time.time() - t0 > 60 * args.minutes:
            break
        if not order:
            order = list(rng.permutation(args.scenes))
        ex = scene_example(int(order.pop()), adapter.processing, args.relation_draws)
        keep = steps_templates(args, step)
        if keep is not None:
            ex.questions = [q for q in ex.questions if q.template in keep]
            if not ex.questions:
                continue
        if step < args.views_from * args.steps:
            first_image(ex)
        lr = args.lr * (min(1.0, (step + 1) / WARMUP) if step < WARMUP else
                        lr_factor((step - WARMUP) / max(1, args.steps - WARMUP), args.lr_decay_frac))
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"]
        share = room_keep_share(step, int(args.room_curriculum * args.steps), int(args.room_hold * args.steps),
                                args.room_keep)
        loss = scene_loss(adapter, vocab, heads, ex, w, log, count_w, share, room_rng)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.setdefault("loss", []).append(loss.item())
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            row = {"step": step, "min": round((time.time() - t0) / 60, 2), "lr": lr,
                   "loss": float(np.mean(log["loss"])),
                   "answer_acc": sum(log["hits"]) / max(1, sum(log["questions"]))}
            for k in ("answer_ce", "token_class_acc", "position", "locate", "candidate_distance", "compare"):
                if log.get(k):
                    m = float(np.mean(log[k]))
                    row[k] = math.sqrt(m) if k in ("position", "locate", "candidate_distance") else m
            history.append(row)
            print(json.dumps(row), flush=True)
            log = {}
    vl.eval()
    return {"adapter": adapter, "tok": tok, "steps": step, "history": history, "train_s": time.time() - t0,
            "tower": tower}


def main(argv=None) -> None:
    args = parse(argv)
    from adatoken_compile.io import check_output
    from adatoken_compile.models.testing import save_qwen25vl

    check_output(args.out, "checkpoint", overwrite=args.overwrite)
    res = train(args)
    argv = sys.argv[1:] if argv is None else argv
    record = {"command": "python -m reference_model.qwen.train " + " ".join(shlex.quote(a) for a in argv),
              "settings": vars(args), "data": {"generator": "adatoken_compile.benchmark3d (procedural rooms)",
                                               "split": "train", "scene_seeds": [0, args.scenes - 1],
                                               "images": "dataset.scene_images: bird's-eye view + views 9, 19"},
              "tower": res["tower"], "steps": res["steps"], "train_minutes": round(res["train_s"] / 60, 2),
              "threads": args.threads, "torch": torch.__version__, "history": res["history"]}
    save_qwen25vl(res["adapter"].vl, res["tok"], args.out, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                  overwrite=args.overwrite, extra={"TRAINING.json": record})
    print(f"wrote {args.out} ({res['steps']} steps, {res['train_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
