"""Are clean class features enough for llava3d-tiny's decoder? Training with an oracle.

    python -m reference_model.experiments.oracle_class_features --out OUT [any reference_model.train option]

Runs ``python -m reference_model.train`` unchanged except that every object patch's tower
feature gets a fixed random vector of its class added (96-d, standard normal, norm about 10;
the tower features have norm about 25) before the 3D position embedding and voxel pooling: class
becomes as easy to read from a scene token as colour is. Compare the printed training answer
accuracy with the same command without the oracle. Without --workers: the oracle lives in this
process, not in spawned render workers. A diagnostic whose numbers MODEL_CARD.md quotes.
"""
import sys

import torch

from reference_model import loop, scenes
from reference_model.config import VISION
from reference_model.scenes import ROOM_LABELS, SceneCache
from reference_model.train import main

_labels = {}
patch_labels = scenes.patch_labels


def patch_labels_kept(*args, **kw):
    out = patch_labels(*args, **kw)
    _labels["cls"] = torch.from_numpy(out[0].reshape(-1))  # the scene whose features are computed next
    return out


CLASS_VECTORS = torch.randn(16, VISION["hidden_size"], generator=torch.Generator().manual_seed(123))


class OracleSceneCache(SceneCache):
    def __call__(self, scene):
        f, xyz, vmap = super().__call__(scene)
        c = _labels.pop("cls")
        obj = c >= ROOM_LABELS
        f = f.clone()
        f[obj] += CLASS_VECTORS[c[obj]]
        return f, xyz, vmap


if __name__ == "__main__":
    scenes.patch_labels = patch_labels_kept  # scene_entry computes a scene's labels, then its features
    loop.SceneCache = OracleSceneCache
    main(sys.argv[1:])
