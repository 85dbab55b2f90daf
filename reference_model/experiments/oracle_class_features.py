"""Are clean class features enough for llava3d-tiny's decoder? train.py with an oracle.

    python docs/experiments/oracle_class_features.py --out /tmp/oracle [any reference_model.train option]

Runs ``python -m reference_model.train`` unchanged except that every object patch's tower
feature gets a fixed random vector of its class added (96-d, standard normal, norm about 10;
the tower features have norm about 25) before the 3D position embedding and voxel pooling: class
becomes as easy to read from a scene token as colour is. Compare the printed training answer
accuracy with the same command without the oracle. Not part of the package or its tests: a
diagnostic whose numbers the README quotes.
"""
import sys

import torch

from reference_model import train as T
_labels = {}
_patch_labels = T._patch_labels


def _patch_labels_kept(*args, **kw):
    out = _patch_labels(*args, **kw)
    _labels["cls"] = torch.from_numpy(out[0].reshape(-1))  # the scene whose features are computed next
    return out


CLASS_VECTORS = torch.randn(16, T.VISION["hidden_size"], generator=torch.Generator().manual_seed(123))


class OracleSceneCache(T.SceneCache):
    def __call__(self, scene):
        f, xyz, vmap = super().__call__(scene)
        c = _labels.pop("cls")
        obj = c >= T.ROOM_LABELS
        f = f.clone()
        f[obj] += CLASS_VECTORS[c[obj]]
        return f, xyz, vmap


T._patch_labels = _patch_labels_kept
T.SceneCache = OracleSceneCache
T.main(sys.argv[1:])
