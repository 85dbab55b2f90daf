"""Where does a relation question lose its inputs? Ridge probes on a checkpoint's hidden states.

    python -m reference_model.experiments.relation_probe MODEL_DIR [SCENES] [RIDGE]

Runs the checkpoint (through its own adapter) on every relation question ("which is closer to the
red object, the blue one or the green one?") of validation scenes 1,000,000 .. +SCENES (default
500), one question per forward pass, and keeps the hidden state after every layer at the three
colour words (c0, c1, c2, in question order) and at the last prompt position. Ridge regressions
(standardised features, penalty RIDGE, default 100) fitted on two thirds of the scenes, scored on
the rest (R^2 on held-out rows):

- at each colour word: the named object's floor position (x / y, metres from the room's centre)
  and its class (one-hot ridge, argmax accuracy; chance ~0.2), i.e. did the word's look-up fetch
  the object, and did it fetch where the object is;
- at the last position: the three objects' positions (mean R^2 of x and y), the distance
  difference d1 - d2 the answer is the sign of, and that sign's accuracy; the same d1 - d2 probe
  at each colour word (d1 - d2 is not linear in the positions: a linear probe finds it only where
  the model has computed it).

A diagnostic whose numbers MODEL_CARD.md quotes.
"""
import sys

import numpy as np
import torch

from adatoken_compile.benchmark3d.questions import floor_distance, questions_for
from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES
from adatoken_compile.models.llava3d import Llava3DAdapter, splice
from adatoken_compile.runtime.prompt import IMAGE_TOKEN_INDEX
from reference_model.experiments.probes import fit_ridge
from reference_model.scenes import render

torch.set_num_threads(1)
ad = Llava3DAdapter(sys.argv[1])
n_scenes = int(sys.argv[2]) if len(sys.argv) > 2 else 500
lam = float(sys.argv[3]) if len(sys.argv) > 3 else 100.0
dec = ad.decoder.eval()
WORDS = ("c0", "c1", "c2")
at = {k: [] for k in WORDS + ("last",)}
xy = {k: [] for k in WORDS}
cls = {k: [] for k in WORDS}
diff, pos3, scene_of = [], [], []
for si, seed in enumerate(range(1_000_000, 1_000_000 + n_scenes)):
    info, r = render(seed)
    rel = [q for q in questions_for(info) if q.kind == "relation"]
    if not rel:
        continue
    sp = ad.spatial_tokens(r.scene)
    half_room = np.asarray(info.room, np.float32)[:2] / 2
    for q in rel:
        ids = ad.prompt_ids(q.text)
        k = ids.index(IMAGE_TOKEN_INDEX)
        words = [ad.tokenizer.decode([i]).strip() if i != IMAGE_TOKEN_INDEX else "" for i in ids]
        cpos = [i for i, w in enumerate(words) if w in COLOR_NAMES]
        objs = [next(o for o in info.objects if o.color == words[i]) for i in cpos]
        x = splice(ids, ad.embed_ids, sp).embeds[None]  # the adapter's own splice
        with torch.no_grad():
            H = torch.stack([h[0] for h in dec(inputs_embeds=x, output_hidden_states=True).hidden_states])
        for name, i, o in zip(WORDS, cpos, objs):
            at[name].append(H[:, i - 1 + len(sp) if i > k else i])  # text after the placeholder shifts by the scene
            xy[name].append(o.center[:2] - half_room)
            cls[name].append(CLASSES.index(o.cls))
        at["last"].append(H[:, -1])
        diff.append(floor_distance(objs[0], objs[1]) - floor_distance(objs[0], objs[2]))
        pos3.append(np.concatenate([o.center[:2] - half_room for o in objs]))
        scene_of.append(si)
scene_of = np.array(scene_of)
fit, test = scene_of % 3 != 0, scene_of % 3 == 0
print(f"{len(scene_of)} relation questions from {n_scenes} validation scenes; fit {fit.sum()}, test {test.sum()}; ridge {lam}")


def ridge(X, Y):
    Y = torch.as_tensor(np.asarray(Y), dtype=torch.float64)
    P = fit_ridge(X[fit], Y[fit], X[test], lam=lam)
    T = Y[test]
    return P, T, (1 - ((P - T) ** 2).sum(0) / ((T - T.mean(0)) ** 2).sum(0)).numpy()


D = torch.tensor(diff, dtype=torch.float64)[:, None]
for layer in range(at["last"][0].shape[0]):
    row = [f"layer {layer}"]
    X = {name: torch.stack([h[layer] for h in hs]) for name, hs in at.items()}
    for name in WORDS:
        _, _, r2 = ridge(X[name], np.stack(xy[name]))
        c = torch.tensor(cls[name])
        P, _, _ = ridge(X[name], torch.nn.functional.one_hot(c, len(CLASSES)))
        row.append(f"{name} xy R2 {r2[0]:.2f}/{r2[1]:.2f} class {(P.argmax(1) == c[torch.from_numpy(test)]).double().mean():.2f}")
    _, _, r2 = ridge(X["last"], np.stack(pos3))
    row.append("last p0/p1/p2 R2 " + "/".join(f"{(r2[2 * i] + r2[2 * i + 1]) / 2:.2f}" for i in range(3)))
    for name in ("last",) + WORDS:  # printed as "d1-d2" (last position), "c0 d1-d2", ...
        P, T, r2d = ridge(X[name], D)
        label = "" if name == "last" else f"{name} "
        row.append(f"{label}d1-d2 R2 {r2d[0]:.2f} sign {((P > 0) == (T > 0)).double().mean():.2f}")
    print(" | ".join(row), flush=True)
