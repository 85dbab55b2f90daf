"""Can llava3d-tiny's decoder learn a distance comparison, and with which supervision? A toy.

    python -m reference_model.experiments.relation_toy                      # answer at the last token only
    python -m reference_model.experiments.relation_toy --dense               # also at the c2 word (as --dense-from key-word)
    python -m reference_model.experiments.relation_toy --locate 1            # + each colour word reads its object's xy after layer 2
    python -m reference_model.experiments.relation_toy --locate 1 --dist 1   # + c1 / c2 words read their distance to c0 after layer 4

The same decoder as the bundled model (Llama, 8 layers x 128, 4 heads, FFN 384, text embeddings
std 0.3, RoPE theta 1e6, mlp2x_gelu projector, AdamW) reads a "scene" of 4-6 objects, each of a
different colour, each 10-30 tokens of (colour feature + position feature + noise) in 64-d, where
the position feature is a fixed random linear map of the object's floor position (uniform in
[-2, 2]^2 m), plus ``--background`` background tokens, shuffled, then the question tokens
``which c0 c1 c2 ?``. It must answer the colour of whichever of c1 / c2 is closer to c0 (the two
distances differ by >= 0.5 m; chance 0.5). The read-outs are training-only linear heads, as the
training options --locate-weight / --distance-weight. Prints the answer accuracy at the last
token over the last 100 steps. A diagnostic whose numbers MODEL_CARD.md quotes.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from reference_model.config import DECODER

COLOURS = 6
WHICH, QMARK = 20, 21  # token ids; colour c is token c


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dense", action="store_true", help="answer loss also at the c2 word")
    p.add_argument("--locate", type=float, default=0.0, help="weight of the xy read-out at each colour word")
    p.add_argument("--dist", type=float, default=0.0, help="weight of the distance-to-c0 read-out at c1 / c2")
    p.add_argument("--background", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=24, rope_theta=1e6, **DECODER)
    cfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(cfg)
    nn.init.normal_(lm.model.embed_tokens.weight, std=0.3)
    D = DECODER["hidden_size"]
    col_f, bg_f, pos_map = torch.randn(COLOURS, 64), torch.randn(64), torch.randn(2, 64)
    proj = nn.Sequential(nn.Linear(64, D), nn.GELU(), nn.Linear(D, D))
    loc_head, dist_head = nn.Linear(D, 2), nn.Linear(D, 1)
    params = [*lm.parameters(), *proj.parameters(), *loc_head.parameters(), *dist_head.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01, betas=(0.9, 0.98))

    def item():
        while True:
            n = int(torch.randint(4, 7, (1,)))
            cols, xy = torch.randperm(COLOURS)[:n], torch.rand(n, 2) * 4 - 2
            d1, d2 = (xy[1] - xy[0]).norm(), (xy[2] - xy[0]).norm()
            if abs(d1 - d2) >= 0.5:
                break
        toks = [col_f[c] + xy[i] @ pos_map + 0.5 * torch.randn(int(torch.randint(10, 31, (1,))), 64)
                for i, c in enumerate(cols)]
        toks.append(bg_f + 0.5 * torch.randn(a.background, 64))
        t = torch.cat(toks)
        q = torch.tensor([WHICH, int(cols[0]), int(cols[1]), int(cols[2]), QMARK])
        return t[torch.randperm(len(t))], q, int(cols[1] if d1 < d2 else cols[2]), xy[:3], torch.stack([d1, d2])

    t_start, acc = time.time(), []
    for step in range(a.steps):
        items = [item() for _ in range(a.batch)]
        L = max(len(t) for t, *_ in items)
        x = torch.stack([torch.cat([torch.zeros(L - len(t), D), proj(t), lm.model.embed_tokens(q)])
                         for t, q, *_ in items])
        lab = torch.full(x.shape[:2], -100)
        lab[:, -1] = torch.tensor([ans for _, _, ans, _, _ in items])
        if a.dense:
            lab[:, -2] = lab[:, -1]  # the c2 word (its next token is "?")
        out = lm(inputs_embeds=x, output_hidden_states=True)
        loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), lab.flatten())
        words = slice(-4, -1)  # c0, c1, c2
        if a.locate:
            h = out.hidden_states[2][:, words]
            loss = loss + a.locate * nn.functional.mse_loss(loc_head(h), torch.stack([xy for *_, xy, _ in items]))
        if a.dist:
            h = out.hidden_states[4][:, -3:-1]  # c1, c2
            loss = loss + a.dist * nn.functional.mse_loss(dist_head(h)[..., 0], torch.stack([d for *_, d in items]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc.append((out.logits[:, -1].argmax(-1) == lab[:, -1]).float().mean().item())
        if step % 100 == 99:
            print(f"step {step + 1} loss {loss.item():.3f} acc {sum(acc[-100:]) / 100:.3f} {time.time() - t_start:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
