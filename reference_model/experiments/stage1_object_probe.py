"""Can the stage-1 vision tower tell object classes apart? Linear probe on object patches.

    python -m reference_model.experiments.stage1_object_probe STEPS [--width 96] [--scenes 600] [--views 5]
                                                               [--object-weight 5] [--cache PATH]

Runs stage 1 of the training (``reference_model.vision.vision_stage``: seed 0, one thread; with
``--cache`` an existing tower of the same settings is reused and a new one is saved there), then
fits a linear probe for the object class on the penultimate-layer features of the object patches
of 30 held-out scenes (seeds 700000-700029: 3/4 of the patches to fit, the last 1/4 to test) and
prints fit/test accuracy and the test confusion matrix. A diagnostic whose numbers MODEL_CARD.md
quotes.
"""
import argparse

import torch

from adatoken_compile.benchmark3d.world import CLASSES
from adatoken_compile.models.testing import CLIP_MEAN, CLIP_STD
from adatoken_compile.runtime.scene import preprocess_scene
from reference_model.config import VISION
from reference_model.experiments.probes import fit_linear_probe
from reference_model.scenes import ROOM_LABELS, render, render_labels
from reference_model.vision import vision_stage

p = argparse.ArgumentParser()
p.add_argument("steps", type=int)
p.add_argument("--width", type=int, default=VISION["hidden_size"])
p.add_argument("--scenes", type=int, default=600)
p.add_argument("--views", type=int, default=5)
p.add_argument("--object-weight", type=float, default=5.0)
p.add_argument("--cache", default=None)
a = p.parse_args()
torch.set_num_threads(1)
VISION.update(hidden_size=a.width, intermediate_size=4 * a.width)  # the one dict every stage-1 module reads
tower, settings, _ = vision_stage(0, a.scenes, a.steps, a.object_weight, a.views, cache=a.cache)
X, Y = [], []
for s in range(700000, 700030):
    info, r = render(s)
    pre = preprocess_scene(r.scene, VISION["image_size"], CLIP_MEAN, CLIP_STD)
    c, _, _, _ = render_labels(r, info)
    with torch.no_grad():
        hs = tower(pixel_values=torch.from_numpy(pre.pixel_values), output_hidden_states=True).hidden_states[-2][:, 1:]
    X.append(hs.reshape(-1, hs.shape[-1]))
    Y.append(torch.from_numpy(c.reshape(-1)))
X, Y = torch.cat(X), torch.cat(Y)
obj = Y >= ROOM_LABELS
X, Y = X[obj], Y[obj] - ROOM_LABELS
n = len(X) * 3 // 4
torch.manual_seed(0)
lin, X_fit, X_test = fit_linear_probe(X[:n], Y[:n], len(CLASSES), X[n:])
with torch.no_grad():
    fit = (lin(X_fit).argmax(1) == Y[:n]).float().mean().item()
    pred = lin(X_test).argmax(1)
test = (pred == Y[n:]).float().mean().item()
cm = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
cm.index_put_((Y[n:], pred), torch.ones_like(pred), accumulate=True)
print(f"{settings}: object-patch class probe fit {fit:.3f} test {test:.3f} ({obj.float().mean().item():.3f} of patches are objects)")
print("confusion (rows true, columns predicted):", ", ".join(CLASSES))
print(cm)
