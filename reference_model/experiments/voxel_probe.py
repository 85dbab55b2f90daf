"""Linear probes on a llava3d-tiny checkpoint's voxel tokens: can object class and colour be read?

    python -m reference_model.experiments.voxel_probe MODEL_DIR

Renders training scenes 0..39, pools per-voxel features through the checkpoint's own adapter
modules at three points (tower features without the 3D position embedding, with it, after the
projector), labels each voxel with the majority class/colour of its patches (renderer instance
map), fits a linear probe on 30 scenes and reports accuracy on the other 10, over all voxels and
over object voxels only; and a ridge regression of each voxel's centre (x, y, z in metres) from
the same features, R^2 and rms error on the 10 test scenes (how linearly a token says where it
is, which distance questions need). A diagnostic whose numbers MODEL_CARD.md quotes.
"""
import sys, torch, numpy as np
from adatoken_compile.models.llava3d import Llava3DAdapter
from adatoken_compile.runtime.scene import voxelize
from reference_model.experiments.probes import fit_linear_probe, fit_ridge
from reference_model.scenes import ROOM_LABELS, render, render_labels
from reference_model.targets import voxel_majority
torch.set_num_threads(2)
torch.manual_seed(0)  # the probes' initialisation
ad = Llava3DAdapter(sys.argv[1])
rows = {"raw": [], "raw+pe": [], "projected": []}; ycls, ycol, norms, centres = [], [], [], []
for seed in range(0, 40):
    info, r = render(seed)
    c, k, _, _ = render_labels(r, info)
    with torch.no_grad():
        feats, xyz = ad.spatial_features(r.scene)  # (V*P, Dv) incl. PE
        pe = ad.pe3d(torch.as_tensor(xyz, dtype=torch.float32).reshape(-1, 3))
        feats = feats.reshape(-1, feats.shape[-1]); raw = feats - pe
        vm = voxelize(np.asarray(xyz).reshape(-1, 3)); inv = torch.from_numpy(vm.inverse)
        cnt = torch.bincount(inv, minlength=vm.num_tokens)[:, None].float()
        pool = lambda x: torch.zeros(vm.num_tokens, x.shape[1]).index_add(0, inv, x) / cnt
        pr, pf = pool(raw), pool(feats)
        rows["raw"].append(pr); rows["raw+pe"].append(pf); rows["projected"].append(ad.projector(pf))
        norms.append((raw.norm(dim=1).mean().item(), pe.norm(dim=1).mean().item()))
        pc = torch.from_numpy(c.reshape(-1)); pk = torch.from_numpy(k.reshape(-1))
        vc, vk = voxel_majority(pc, inv, vm.num_tokens), voxel_majority(pk, inv, vm.num_tokens)
        ycls.append(vc); ycol.append(vk); centres.append(torch.from_numpy(vm.centers).double())
print("mean |tower feature| %.2f  |3D PE| %.2f" % tuple(np.mean(norms, 0)))
ntr = 30
for name, xs in rows.items():
    Xtr, Xte = torch.cat(xs[:ntr]), torch.cat(xs[ntr:])
    out = []
    for ys, n in ((ycls, 8), (ycol, 7)):
        ytr, yte = torch.cat(ys[:ntr]), torch.cat(ys[ntr:])
        lin, _, Xte_n = fit_linear_probe(Xtr, ytr, n, Xte)
        with torch.no_grad():
            pred = lin(Xte_n).argmax(1); obj = (yte if n == 8 else torch.cat(ycls[ntr:])) >= ROOM_LABELS
            out.append(((pred == yte).float().mean().item(), (pred[obj] == yte[obj]).float().mean().item()))
    P, T = fit_ridge(Xtr, torch.cat(centres[:ntr]), Xte), torch.cat(centres[ntr:])  # the voxel centre
    r2 = 1 - ((P - T) ** 2).sum(0) / ((T - T.mean(0)) ** 2).sum(0); rms = ((P - T) ** 2).mean(0).sqrt()
    print(f"{name:10s} position R^2 x/y/z " + "/".join(f"{v:.2f}" for v in r2) + "  rms m " + "/".join(f"{v:.2f}" for v in rms))
    print(f"{name:10s} class acc all {out[0][0]:.3f} objects {out[0][1]:.3f} | colour acc all {out[1][0]:.3f} objects {out[1][1]:.3f}")
print("object voxel share %.3f" % (torch.cat(ycls) >= ROOM_LABELS).float().mean().item())
