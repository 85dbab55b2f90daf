"""A rank's share of the data: whole calibration batches (or whole scenes) round-robin by index,
and only the scenes the share uses are rendered (the rest of the torchrun path runs in
tests/integration/test_torchrun.py)."""

from __future__ import annotations

from adatoken_compile import distributed
from adatoken_compile.benchmark3d import dataset
from adatoken_compile.data import load_samples


def test_a_share_holds_whole_batches_or_scenes_and_renders_only_its_own(monkeypatch):
    every = load_samples("builtin:test", limit=14)
    scene_of = [len({id(s.scene) for s in every[: i + 1]}) - 1 for i in range(len(every))]
    assert max(scene_of) >= 2  # a few scenes, each split across batches
    rendered = []
    real = dataset.render_scene
    monkeypatch.setattr(dataset, "render_scene", lambda info: rendered.append(info.seed) or real(info))
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)

    share = distributed.Share(block=4)
    mine = load_samples("builtin:test", limit=14, keep=share)
    assert share.positions == [4, 5, 6, 7, 12, 13]  # the second and fourth batch of 4
    assert [(s.question, s.meta) for s in mine] == [(every[i].question, every[i].meta) for i in share.positions]
    assert share.scenes == max(scene_of) + 1  # what every rank knows of the whole
    assert sorted(set(rendered)) == sorted({s.meta["seed"] for s in mine})  # only the scenes it uses
    assert all(s.scene.images.shape == every[i].scene.images.shape for s, i in zip(mine, share.positions))

    by_scene = distributed.Share(by_scene=True)
    mine = load_samples("builtin:test", limit=14, keep=by_scene)
    assert by_scene.positions == [i for i, j in enumerate(scene_of) if j % 2 == 1]
    assert [s.question for s in mine] == [every[i].question for i in by_scene.positions]
