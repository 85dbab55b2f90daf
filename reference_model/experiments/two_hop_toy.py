"""Why llava3d-tiny's decoder stalls at the text-only prior: a toy of its look-up task.

    python -m reference_model.experiments.two_hop_toy --label end             # answer at the last prompt token
    python -m reference_model.experiments.two_hop_toy --label word            # answer at the class word itself
    python -m reference_model.experiments.two_hop_toy --label dense           # both (deep supervision)
    python -m reference_model.experiments.two_hop_toy --label dense --same-scene   # one scene per batch

The same decoder as the bundled model (Llama, 8 layers x 128, 4 heads, FFN 384, text embeddings
std 0.3, mlp2x_gelu projector, AdamW 1e-3) reads a "scene" of 3-5 objects, each 20-50 tokens of
(class feature + colour feature + noise) in 64-d, plus ``--background`` background tokens, shuffled,
then the question tokens ``what color is the <class> ? :``. It must answer the queried object's
colour (6 colours; chance 0.17; guessing the scene's most frequent colour gives about 0.4).

``--label word`` is a one-hop look-up (the class word's own position queries the scene);
``--label end`` needs two hops (the last token must first fetch the class word, then the scene).
Prints steps, loss and the answer accuracy at the last token over the last 50 steps.
A diagnostic whose numbers MODEL_CARD.md quotes.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--label", choices=("end", "word", "dense"), default="end")
    p.add_argument("--background", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--same-scene", action="store_true", help="all questions of a batch about one scene")
    p.add_argument("--rope-theta", type=float, default=1e4)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=40, hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=384, max_position_embeddings=4096,
                      rope_theta=a.rope_theta)
    cfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(cfg)
    nn.init.normal_(lm.model.embed_tokens.weight, std=0.3)
    D = 128
    cls_f, col_f = torch.randn(6, 64), torch.randn(7, 64)  # class 5 / colour 6: background
    proj = nn.Sequential(nn.Linear(64, D), nn.GELU(), nn.Linear(D, D))
    opt = torch.optim.AdamW(list(lm.parameters()) + list(proj.parameters()), lr=1e-3, weight_decay=0.01,
                            betas=(0.9, 0.98))

    def scene():
        n = int(torch.randint(3, 6, (1,)))
        classes, cols = torch.randperm(5)[:n], torch.randint(0, 6, (n,))
        toks = [cls_f[c] + col_f[k] + 0.5 * torch.randn(int(torch.randint(20, 50, (1,))), 64)
                for c, k in zip(classes, cols)]
        toks.append(cls_f[5] + col_f[6] + 0.5 * torch.randn(a.background, 64))
        t = torch.cat(toks)
        return t[torch.randperm(len(t))], classes, cols

    def batch():
        items, sc = [], None
        for b in range(a.batch):
            if sc is None or not a.same_scene:
                sc = scene()
            t, classes, cols = sc
            qi = b % len(classes) if a.same_scene else int(torch.randint(0, len(classes), (1,)))
            q = torch.tensor([11, 12, 13, 14, int(classes[qi]), 17])  # what color is the X ? :
            items.append((t, q, 5 + int(cols[qi])))
        L = max(len(t) for t, _, _ in items)
        xs, ls = [], []
        for t, q, ans in items:
            x = torch.cat([torch.zeros(L - len(t), D), proj(t), lm.model.embed_tokens(q)])
            lab = torch.full((len(x),), -100)
            if a.label in ("end", "dense"):
                lab[-1] = ans
            if a.label in ("word", "dense"):
                lab[-2] = ans
            xs.append(x)
            ls.append(lab)
        return torch.stack(xs), torch.stack(ls)

    t_start, acc = time.time(), []
    for step in range(a.steps):
        x, lab = batch()
        out = lm(inputs_embeds=x).logits
        loss = nn.functional.cross_entropy(out.flatten(0, 1), lab.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        pos = -1 if a.label != "word" else -2
        acc.append((out[:, pos].argmax(-1) == lab[:, pos]).float().mean().item())
        if step % 50 == 49:
            print(f"step {step + 1} loss {loss.item():.3f} acc {sum(acc[-50:]) / 50:.3f} {time.time() - t_start:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
