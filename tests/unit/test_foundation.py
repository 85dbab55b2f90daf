"""Foundation: package layout, checkpoint loading, LLaVA-3D geometry, adapters, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adatoken_compile.cli import main
from adatoken_compile.contract import Sample
from adatoken_compile.errors import InputError
from adatoken_compile.models.llava3d import Llava3DAdapter
from adatoken_compile.runtime.prompt import IMAGE_TOKEN_INDEX, llava_v1_prompt
from adatoken_compile.models.registry import load_adapter
from adatoken_compile.models.testing import random_llava3d
from adatoken_compile.runtime.scene import (
    load_scene, pool_numpy, preprocess_scene, unproject_patches, validate_scene, voxelize,
)

from conftest import simple_scene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- checkpoints

def _reference_lm(model_dir):
    """The installed HF class with the checkpoint's decoder weights, loaded independently."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    qwen = "qwen" in cfg["model_type"]
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "head_dim", "rope_parameters")
    c = (Qwen2Config if qwen else LlamaConfig)(**{k: cfg[k] for k in keys if k in cfg})
    lm = (Qwen2ForCausalLM if qwen else LlamaForCausalLM)(c).eval()
    sd = {}
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    for f in files:
        sd.update(load_file(os.path.join(model_dir, f)))
    lm.load_state_dict({k: v for k, v in sd.items() if k in lm.state_dict()}, strict=True)
    return lm


@pytest.mark.parametrize(
    "kw",
    [
        dict(decoder="llama", shards=1),
        dict(decoder="llama", shards=3),
        dict(decoder="qwen2", heads=4, kv_heads=2, shards=2),  # GQA
        dict(decoder="llama", heads=3, head_dim=16, hidden=48, shards=1),  # odd head count
    ],
    ids=["llama-single", "llama-sharded", "qwen2-gqa", "odd-heads"],
)
def test_decoder_logits_match_installed_class(tmp_path, kw):
    d = random_llava3d(str(tmp_path / "m"), layers=2, seed=1, **kw)
    a = Llava3DAdapter(d)
    batch = a.prepare([Sample("what color is the ball?", scene=simple_scene()),
                       Sample("how many chairs are there?", scene=simple_scene(seed=1))])
    ref = _reference_lm(d)
    for b in range(2):
        row = batch.row(b)
        got = a.decoder(inputs_embeds=row.inputs_embeds).logits
        want = ref(inputs_embeds=row.inputs_embeds).logits
        assert (got - want).abs().max().item() <= 1e-5
    # the padded batch gives each row's own logits
    got = a.decoder(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids).logits
    for b in range(2):
        n = batch.lengths()[b]
        want = ref(inputs_embeds=batch.row(b).inputs_embeds).logits
        assert (got[b, -n:] - want[0]).abs().max().item() <= 1e-4


def test_loader_maps_every_tensor(tiny3d_dir):
    a = Llava3DAdapter(tiny3d_dir)
    sd = load_file(os.path.join(tiny3d_dir, "model.safetensors"))
    n_mapped = len(a.decoder.state_dict()) + len(a.pe3d.state_dict()) + len(a.projector.state_dict()) + len(a.box_pe.state_dict())
    assert n_mapped == len(sd)
    for k, v in a.decoder.state_dict().items():
        assert torch.equal(v, sd[k]), k
    pe = "model.video_tower.video_tower.positional_embedding.position_embedding_head.1.weight"
    assert torch.equal(a.pe3d.position_embedding_head[1].weight, sd[pe])
    assert torch.equal(a.projector[2].bias, sd["model.mm_projector.2.bias"])


def _copy_ckpt(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_and_unexpected_keys_are_named(tiny3d_dir, tmp_path):
    d = _copy_ckpt(tiny3d_dir, tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, path)
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        Llava3DAdapter(d)
    sd = load_file(os.path.join(tiny3d_dir, "model.safetensors"))
    sd["model.mm_projector.7.weight"] = torch.zeros(2)
    save_file(sd, path)
    with pytest.raises(InputError, match=r"unexpected tensor 'model\.mm_projector\.7\.weight'"):
        Llava3DAdapter(d)


def test_clip_weights_inside_checkpoint_are_ignored(tiny3d_dir, tmp_path):
    d = _copy_ckpt(tiny3d_dir, tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    sd["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(3)
    save_file(sd, path)
    Llava3DAdapter(d)  # upstream ignores them: so do we


def test_pickle_checkpoint_refused(tiny3d_dir, tmp_path):
    d = _copy_ckpt(tiny3d_dir, tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    torch.save({"x": torch.zeros(1)}, os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(InputError, match="pickle-format weights are refused"):
        Llava3DAdapter(d)


def test_vision_tower_override_and_missing(tiny3d_dir, tmp_path):
    d = _copy_ckpt(tiny3d_dir, tmp_path / "m")
    moved = str(tmp_path / "clip")
    os.rename(os.path.join(d, "vision_tower"), moved)
    with pytest.raises(InputError, match="--vision-tower"):
        Llava3DAdapter(d)
    a = Llava3DAdapter(d, vision_tower=moved)
    assert a.image_size == 56 and a.patch_size == 14


def test_sdpa_and_eager_selectable(tiny3d_dir):
    s = [Sample("what color is the ball?", scene=simple_scene())]
    outs = {}
    for impl in ("sdpa", "eager"):
        a = load_adapter(tiny3d_dir, attn_implementation=impl)
        assert a.decoder.config._attn_implementation == impl
        b = a.prepare(s)
        outs[impl] = a.decoder(inputs_embeds=b.inputs_embeds).logits
    assert (outs["sdpa"] - outs["eager"]).abs().max().item() < 1e-4
    with pytest.raises(InputError, match="flash"):
        load_adapter(tiny3d_dir, attn_implementation="flash_attention_2")


# ----------------------------------------------------------------------------- prompt / splice

def test_prompt_tokenized_in_chunks_with_one_bos(tiny3d_dir):
    a = Llava3DAdapter(tiny3d_dir)
    q = "what color is the ball?"
    ids = a.prompt_ids(q)
    tok = a.tokenizer
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    pre, post = llava_v1_prompt(q).split("<image>")
    assert ids == [tok.bos_id] + tok.encode(pre) + [IMAGE_TOKEN_INDEX] + tok.encode(post)
    assert llava_v1_prompt(q).endswith("USER: <image>\nwhat color is the ball? ASSISTANT:")
    seg = a.segment(Sample(q, scene=simple_scene()))
    (s, e), = seg.spans()
    n_sp = a.spatial_tokens(simple_scene()).shape[0]
    assert (s, e - s) == (1 + len(tok.encode(pre)), n_sp)
    assert int(seg.embeds.shape[0]) == len(ids) - 1 + n_sp


def test_boxes_placeholder_becomes_one_token(tiny3d_dir):
    a = Llava3DAdapter(tiny3d_dir)
    q = "what is at <boxes> ?"
    ids = a.prompt_ids(q)
    assert ids.count(-300) == 1
    seg = a.segment(Sample(q, scene=simple_scene(), boxes=np.array([[1.0, 2.0, 0.5]])))
    plain = a.segment(Sample("what is at ?", scene=simple_scene()))
    j = ids.index(-300) - 1 + a.spatial_tokens(simple_scene()).shape[0]
    want = a.box_pe(torch.tensor([[1.0, 2.0, 0.5]]))[0]
    assert torch.allclose(seg.embeds[j], want)
    assert not seg.spatial[j]
    with pytest.raises(InputError, match="box location"):
        a.segment(Sample(q, scene=simple_scene()))
    assert plain.embeds.shape[0] <= seg.embeds.shape[0]


# ----------------------------------------------------------------------------- geometry

def test_unprojection_hand_computed():
    # one view, 4x4 image, patch 2: patches take pixels (0,0),(0,2),(2,0),(2,2)
    depth = np.full((1, 4, 4), 2.0, np.float32)
    K = np.eye(4)[None].copy()
    K[0, 0, 0] = K[0, 1, 1] = 2.0
    K[0, 0, 2] = K[0, 1, 2] = 2.0
    pose = np.eye(4)[None].copy()
    pose[0, :3, 3] = [10.0, 0.0, 1.0]
    xyz = unproject_patches(depth, K, pose, 2)
    # u=col, v=row: x=(u-2)*2/2, y=(v-2)*2/2, z=2; then + translation
    want = np.array([[-2, -2, 2], [0, -2, 2], [-2, 0, 2], [0, 0, 2]], np.float32) + [10, 0, 1]
    np.testing.assert_allclose(xyz[0], want, atol=1e-6)


def test_unprojection_with_rotation():
    depth = np.full((1, 2, 2), 1.0, np.float32)
    K = np.eye(4)[None].copy()
    pose = np.eye(4)[None].copy()
    # camera looks along world +x: camera z -> world x, camera x -> world -y, camera y -> world -z
    pose[0, :3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)
    xyz = unproject_patches(depth, K, pose, 1)
    np.testing.assert_allclose(xyz[0, 3], [1.0, -1.0, -1.0], atol=1e-6)  # pixel (u=1,v=1)


def test_voxel_pooling_hand_computed():
    pts = np.array(
        [[0.01, 0.0, 0.0], [0.05, 0.02, 0.0], [0.41, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.6]], np.float32
    )
    vm = voxelize(pts, 0.2)
    # rounded keys: (0,0,0),(0,0,0),(2,0,0),(0,1,0),(0,0,3) -> 4 voxels; dims (3,2,4): x-major keys
    assert vm.num_tokens == 4
    assert vm.keys.tolist() == sorted(vm.keys.tolist())
    # x-major order: (0,0,0)=0, (0,0,3)=3, (0,1,0)=4, (2,0,0)=16
    assert vm.keys.tolist() == [0, 3, 4, 16]
    assert vm.inverse.tolist() == [0, 0, 3, 2, 1]
    feats = np.arange(10, dtype=np.float32).reshape(5, 2)
    pooled = pool_numpy(feats, vm)
    np.testing.assert_allclose(pooled[0], [1.0, 2.0])  # mean of rows 0 and 1
    np.testing.assert_allclose(pooled[3], [4.0, 5.0])
    from adatoken_compile.models.llava3d import pool_torch

    np.testing.assert_allclose(pool_torch(torch.from_numpy(feats), vm).numpy(), pooled, atol=1e-6)


def test_voxel_cap_is_deterministic():
    pts = np.stack(np.meshgrid(np.arange(60), np.arange(60), [0], indexing="ij"), -1).reshape(-1, 3) * 0.2
    a, b = voxelize(pts, 0.2, max_tokens=2560), voxelize(pts, 0.2, max_tokens=2560)
    assert a.num_tokens == 2560 and np.array_equal(a.keys, b.keys)
    assert (a.inverse >= 0).sum() == 2560


def test_preprocess_resize_crop_adjusts_intrinsics():
    s = simple_scene(V=1, H=60, W=80)
    pre = preprocess_scene(s, 30, [0.5] * 3, [0.5] * 3)
    assert pre.pixel_values.shape == (1, 3, 30, 30)
    # shortest side 60 -> 30 (scale 0.5), width 80 -> 40, crop 5 px from the left
    np.testing.assert_allclose(pre.intrinsics[0, 0, 0], 30.0)
    np.testing.assert_allclose(pre.intrinsics[0, 0, 2], 40 * 0.5 - 5)
    np.testing.assert_allclose(pre.intrinsics[0, 1, 2], 30 * 0.5)
    # a pixel's world point is preserved through resize + crop (nearest depth, sampled at the
    # destination pixel's centre as Pillow's NEAREST does)
    xyz_small = unproject_patches(pre.depths, pre.intrinsics, pre.poses, 1)[0].reshape(30, 30, 3)
    r, c = 10, 7
    src_r, src_c = int((r + 0.5) * 60 / 30), int((c + 5 + 0.5) * 80 / 40)
    assert pre.depths[0, r, c] == s.depths[0, src_r, src_c]
    d = s.depths[0, src_r, src_c]
    x = (src_c - 40) * d / 60.0
    assert abs(xyz_small[r, c, 0] - x) < 0.05 * max(1.0, abs(x)) + 0.05


# ----------------------------------------------------------------------------- scene validation

def _arrays():
    s = simple_scene()
    return {"images": s.images, "depths": s.depths, "poses": s.poses, "intrinsics": s.intrinsics}


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda a: a.pop("depths"), r"missing key 'depths'.*\(V,Hd,Wd\)"),
        (lambda a: a.__setitem__("images", a["images"][..., :2]), r"'images' has shape .*\(V,H,W,3\)"),
        (lambda a: a.__setitem__("images", a["images"].astype(np.float32)), r"'images' has dtype float32, expected uint8"),
        (lambda a: a.__setitem__("poses", a["poses"][:2]), r"V mismatch: key 'poses'"),
        (lambda a: a["depths"].__setitem__((0, 0, 0), np.nan), r"'depths' contains NaN or inf"),
        (lambda a: a["intrinsics"].__setitem__((0, 0, 0), np.inf), r"'intrinsics' contains NaN or inf"),
        (lambda a: a["depths"].__setitem__(Ellipsis, 0.0), r"'depths' is all zero"),
        (lambda a: a.__setitem__("depths", a["depths"][..., None]), r"'depths' has shape"),
        (lambda a: a.__setitem__("depths", a["depths"][:, :0]), r"'depths' is empty"),
    ],
)
def test_bad_scenes_one_line_errors(mutate, pattern):
    a = _arrays()
    mutate(a)
    with pytest.raises(InputError, match=pattern) as ei:
        validate_scene(a, name="s.npz")
    assert "\n" not in str(ei.value) and str(ei.value).startswith("s.npz")


def test_scene_roundtrip_and_bad_file(tmp_path):
    p = str(tmp_path / "s.npz")
    simple_scene().save(p)
    s = load_scene(p)
    assert s.images.shape == (3, 60, 80, 3)
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="bad.npz"):
        load_scene(str(bad))


# ----------------------------------------------------------------------------- HF LLaVA

@pytest.mark.parametrize("decoder,kv", [("llama", None), ("qwen2", 2)])
def test_hf_llava_adapter(tmp_path, decoder, kv):
    from adatoken_compile.models.testing import random_llava_hf
    from adatoken_compile.runtime.image import preprocess_image

    d = random_llava_hf(str(tmp_path / "hf"), decoder=decoder, kv_heads=kv)
    a = load_adapter(d)
    assert a.family == "llava-hf" and type(a.decoder).__name__.lower().startswith(decoder)
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    pix = torch.from_numpy(preprocess_image(img, a.image_size, a.mean, a.std))[None]
    want = a.llava.model.get_image_features(pixel_values=pix).pooler_output[0]
    got = a.spatial_tokens(img)
    assert torch.allclose(got, want, atol=1e-6)
    b = a.prepare([Sample("what color is the ball?", image=img), Sample("how many?", image=img)])
    assert b.spatial_counts() == [(a.image_size // 14) ** 2] * 2
    ours = a.decoder(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    full = a.llava(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    assert (ours - full).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- CLI

def test_cli_inspect_and_run(tiny3d_dir, scene_file):
    r = CliRunner().invoke(main, ["inspect", "--model", tiny3d_dir, "--scene", scene_file, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert (info["num_layers"], info["hidden"], info["heads"], info["kv_heads"]) == (4, 64, 4, 4)
    lay = info["layout"]
    assert lay["prefix"] + lay["spatial"] + lay["suffix"] == lay["total"] and lay["spatial"] > 0
    r = CliRunner().invoke(main, ["run", "--model", tiny3d_dir, "--scene", scene_file, "-q", "what color is the ball?",
                                  "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert "answer:" in r.output


def test_cli_bad_input_one_line_exit_2(tiny3d_dir, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4, 3), np.uint8))
    r = CliRunner().invoke(main, ["run", "--model", tiny3d_dir, "--scene", str(bad), "-q", "x"])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "missing key 'depths'" in r.output
    r = CliRunner().invoke(main, ["inspect", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such model directory" in r.output


def test_both_adapters_provide_the_declared_contract(tiny3d_dir, tmp_path):
    """Every member the Adapter protocol declares (what callers use: dtype, lazy_weights, spec,
    spatial_tokens_xyz, the 3-argument segment) is there on both families; a segment built from
    tokens encoded once equals the one that encodes them itself."""
    from adatoken_compile.contract import Adapter, spatial_source
    from adatoken_compile.models.spec import spec_for
    from adatoken_compile.models.testing import random_llava_hf

    hf = load_adapter(random_llava_hf(str(tmp_path / "hf")))
    for a in (load_adapter(tiny3d_dir), load_adapter(tiny3d_dir, lazy=True), hf):
        assert isinstance(a, Adapter), type(a).__name__
        assert a.dtype == torch.float32 and a.spec is spec_for(a.decoder)
        s = a.example_samples()[0]
        assert spatial_source(a, s) is (s.scene if a.input_kind == "scene" else s.image)
        tokens, xyz = a.spatial_tokens_xyz(spatial_source(a, s))
        once, own = a.segment(s, tokens, xyz), a.segment(s)
        assert torch.equal(once.embeds, own.embeds) and torch.equal(once.spatial, own.spatial)
    assert hf.lazy_weights is None and hf.input_kind == "image"
    assert not load_adapter(tiny3d_dir).lazy_weights and load_adapter(tiny3d_dir, lazy=True).lazy_weights
