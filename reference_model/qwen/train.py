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
from reference_model.schedule import lr_factor

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
    for name, default in vars(Weights()).items():
        ap.add_argument(f"--{name.replace('_', '-')}" + ("" if name.endswith("layer") else "-weight"),
                        dest=name, type=type(default), default=default)
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


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tok, adapter = build(args, os.path.join(tmp, "init"))
    vl = adapter.vl.train()
    w = Weights(**{k: getattr(args, k) for k in vars(Weights())})
    torch.manual_seed(args.seed + 1)
    heads = make_heads(args.width, w)
    params = list(vl.parameters()) + [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    vocab = Vocab.of(tok)
    rng = np.random.default_rng(args.seed)
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
        lr = args.lr * (min(1.0, (step + 1) / WARMUP) if step < WARMUP else
                        lr_factor((step - WARMUP) / max(1, args.steps - WARMUP), args.lr_decay_frac))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = scene_loss(adapter, vocab, heads, ex, w, log)
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
            for k in ("position", "locate", "candidate_distance", "compare"):
                if log.get(k):
                    row[k] = float(np.mean(log[k])) if k == "compare" else math.sqrt(float(np.mean(log[k])))
            history.append(row)
            print(json.dumps(row), flush=True)
            log = {}
    vl.eval()
    return {"adapter": adapter, "tok": tok, "steps": step, "history": history, "train_s": time.time() - t0}


def main(argv=None) -> None:
    args = parse(argv)
    from adatoken_compile.io import check_output
    from adatoken_compile.models.testing import save_qwen25vl

    check_output(args.out, "checkpoint", overwrite=args.overwrite)
    res = train(args)
    save_qwen25vl(res["adapter"].vl, res["tok"], args.out, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                  overwrite=args.overwrite)
    argv = sys.argv[1:] if argv is None else argv
    record = {"command": "python -m reference_model.qwen.train " + " ".join(shlex.quote(a) for a in argv),
              "settings": vars(args), "data": {"generator": "adatoken_compile.benchmark3d (procedural rooms)",
                                               "split": "train", "scene_seeds": [0, args.scenes - 1],
                                               "images": "dataset.scene_images: bird's-eye view + views 9, 19"},
              "steps": res["steps"], "train_minutes": round(res["train_s"] / 60, 2), "threads": args.threads,
              "torch": torch.__version__, "history": res["history"]}
    with open(os.path.join(args.out, "TRAINING.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out} ({res['steps']} steps, {res['train_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
