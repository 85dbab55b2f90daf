"""Stage-1 (vision tower) pretraining length vs how well object patches' class can be read.

    python docs/experiments/stage1_object_probe.py STEPS [OBJECT_WEIGHT [SAVE_PATH]]

Runs stage 1 of adatoken_compile.train (150 scenes, STEPS steps, two threads), then fits a linear
probe for the object class on the penultimate-layer features of object patches of 30 held-out
scenes (3/4 fit, 1/4 test) and prints its accuracy. Not part of the package or its tests.
"""
import sys, torch, numpy as np
from adatoken_compile import train as T
from adatoken_compile.models.tiny import CLIP_MEAN, CLIP_STD
from adatoken_compile.scene import preprocess_scene
steps = int(sys.argv[1])
w = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
torch.set_num_threads(int(__import__('os').environ.get('THREADS', 2)))
vision, st = T.pretrain_vision(range(500000, 500150), steps, CLIP_MEAN, CLIP_STD, log_every=250, object_weight=w)
if len(sys.argv) > 3:
    torch.save({"state_dict": vision.state_dict(), "stats": st}, sys.argv[3])
from torch import nn
X, Y = [], []
for s in range(700000, 700030):
    info, r = T._render(s)
    pre = preprocess_scene(r.scene, 224, CLIP_MEAN, CLIP_STD)
    c, k, _, _ = T._patch_labels(r.instance, info, *r.scene.images.shape[1:3], 224, 14)
    with torch.no_grad():
        hs = vision(pixel_values=torch.from_numpy(pre.pixel_values), output_hidden_states=True).hidden_states[-2][:, 1:]
    X.append(hs.reshape(-1, hs.shape[-1])); Y.append(torch.from_numpy(c.reshape(-1)))
X, Y = torch.cat(X), torch.cat(Y); obj = Y >= 3; X, Y = X[obj], Y[obj]
n = len(X) * 3 // 4
lin = nn.Linear(X.shape[1], 8); opt = torch.optim.Adam(lin.parameters(), 1e-2)
mu, sd = X[:n].mean(0), X[:n].std(0) + 1e-6; Xn = (X - mu) / sd
for _ in range(400):
    opt.zero_grad(); nn.functional.cross_entropy(lin(Xn[:n]), Y[:n]).backward(); opt.step()
print(f"stage-1 steps {steps} object weight {w}: object-patch class probe (held-out scenes) {(lin(Xn[n:]).argmax(1) == Y[n:]).float().mean().item():.3f}, objects {obj.float().mean().item():.3f} of patches")
