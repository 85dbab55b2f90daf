"""compile -> artifact directory -> torch-free ONNX Runtime: parity, integrity, errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adatoken_compile.compiler import pipeline as art_mod
from adatoken_compile.artifact import sha256_file
from adatoken_compile.compiler.pipeline import compile_artifact
from adatoken_compile.cli import main as cli_main
from adatoken_compile.contract import Sample
from adatoken_compile.errors import InputError, ScheduleMismatch
from adatoken_compile.runtime import load
from adatoken_compile.schedule import Cut, Schedule, identity

from conftest import TINY_CUTS, simple_scene

torch.set_num_threads(1)

LAYERS = 4
CUTS = [Cut(*c) for c in TINY_CUTS]
Q_SHORT = "what is here?"
Q_LONG = "how many chairs are next to the big red table by the window in this room?"


@pytest.fixture(scope="module")
def adapter(tiny3d_dir):
    from adatoken_compile.models.registry import load_adapter

    return load_adapter(tiny3d_dir)


@pytest.fixture(scope="module")
def schedule(adapter):
    return Schedule(cuts=list(CUTS), num_layers=LAYERS, fingerprint=adapter.fingerprint(), family="llava3d")


@pytest.fixture(scope="module")
def schedule_file(schedule, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sched") / "schedule.json")
    schedule.save(path)
    return path


@pytest.fixture(scope="module")
def pruned_art(tiny_artifact):
    """The pruned artifact, compiled through the CLI (also the CLI `compile` test)."""
    out, output = tiny_artifact
    assert "prefill" in output and "decode" in output and "MB" in output
    assert f"digest     {load(out).manifest.digest}" in output
    return out


@pytest.fixture(scope="module")
def identity_art(tiny_identity_artifact):
    return tiny_identity_artifact


@pytest.fixture(scope="module")
def rt(pruned_art):
    return load(pruned_art)


@pytest.fixture(scope="module")
def fx_pruned(adapter, schedule):
    """The FX-pruned torch graph (capture + token-drop pass) the artifact's prefill was exported from."""
    from adatoken_compile.compiler.capture import capture
    from adatoken_compile.passes.token_drop import apply_token_drop

    gm = capture(adapter.decoder, art_mod.example_batch(adapter))
    return gm, apply_token_drop(gm, schedule)


SCENES = {"a": simple_scene(V=3, seed=0), "b": simple_scene(V=2, H=48, W=64, seed=1), "c": simple_scene(V=4, seed=2)}
CASES = [
    [("a", Q_SHORT)],
    [("b", Q_LONG)],
    [("c", Q_SHORT), ("b", Q_LONG)],  # batch 2: different spatial counts and lengths, left padding
]


def _samples(case):
    return [Sample(question=q, scene=SCENES[s]) for s, q in case]


def _items(case):
    return [(SCENES[s], q) for s, q in case]


def _fx_outputs(pg, batch) -> dict:
    with torch.no_grad():
        out = pg(batch.inputs_embeds, batch.attention_mask, batch.position_ids, batch.spatial_mask)
    return {k: v.numpy() for k, v in zip(pg.meta["adatoken_layout"]["outputs"], out)}


# ----------------------------------------------------------------------------- manifest


def test_manifest(pruned_art, schedule, adapter):
    with open(os.path.join(pruned_art, "manifest.json")) as f:
        m = json.load(f)
    assert m["format"] == "adatoken-compile/artifact" and m["version"] == 1
    assert set(m["graphs"]) == {"encoder", "projector", "prefill", "decode"}
    for key in ("created_at", "model", "schedule", "versions", "files", "tokenizer", "embed_tokens", "preprocess"):
        assert key in m
    assert set(m["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime", "adatoken_compile"}
    assert m["model"]["fingerprint"] == adapter.fingerprint()
    assert m["model"]["describe"]["num_layers"] == LAYERS
    assert m["schedule"]["cuts"] == schedule.to_dict()["cuts"]
    on_disk = set()
    for dp, _, fns in os.walk(pruned_art):
        for fn in fns:
            on_disk.add(os.path.relpath(os.path.join(dp, fn), pruned_art).replace(os.sep, "/"))
    assert set(m["files"]) == on_disk - {"manifest.json"}  # every file hashed, external data included
    assert {"prefill.onnx.data", "decode.onnx.data", "tokenizer/tokenizer.json", "embed_tokens.npy"} <= set(m["files"])
    for rel, info in m["files"].items():
        p = os.path.join(pruned_art, rel)
        assert info["size"] == os.path.getsize(p) and info["sha256"] == sha256_file(p)
    pre = m["graphs"]["prefill"]
    assert [i["name"] for i in pre["inputs"]] == ["inputs_embeds", "attention_mask", "position_ids", "spatial_mask"]
    outs = [o["name"] for o in pre["outputs"]]
    assert outs[0] == "logits" and "kept.0" in outs and "kept.1" in outs
    assert isinstance(pre["inputs"][0]["shape"][0], str) and isinstance(pre["inputs"][0]["shape"][1], str)
    assert pre["inputs"][0]["shape"][2] == adapter.describe()["hidden"]
    assert pre["external_data"] == ["prefill.onnx.data"] and pre["opset"] >= 18
    dec = [i["name"] for i in m["graphs"]["decode"]["inputs"]]
    assert dec[:2] == ["inputs_embeds", "position_ids"] and "past_length.3" in dec and "past_mask.3" not in dec
    assert m["graphs"]["decode"]["kv"] == "buffers"
    with open(os.path.join(pruned_art, "preprocess.json")) as f:
        p = json.load(f)
    assert p["voxel_size"] == 0.2 and p["max_tokens"] == 2560 and p["placeholders"]["image"] == -200
    assert p["eos_id"] == adapter.eos_token_id and p["max_positions"] == adapter.max_positions
    assert p["positions"] == {"layout": "sequence"}  # the base decoder spec's
    # no graph records where the traced source lives: its digest is the same from any checkout
    import onnx

    from adatoken_compile.compiler.export import SOURCE_METADATA
    for name in m["graphs"]:
        g = onnx.load(os.path.join(pruned_art, f"{name}.onnx"), load_external_data=False)
        keys = {q.key for n in g.graph.node for q in n.metadata_props}
        assert keys and not keys & set(SOURCE_METADATA), (name, keys & set(SOURCE_METADATA))


# ----------------------------------------------------------------------------- parity


def test_encoder_pooling_projector_match_adapter(rt, adapter):
    for s in SCENES.values():
        got = rt.encode_scene(s)
        want = adapter.spatial_tokens(s).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4


def test_prepare_matches_adapter(rt, adapter):
    case = CASES[2]
    feeds = rt.prepare(_items(case))
    ref = adapter.prepare(_samples(case))
    assert np.abs(feeds["inputs_embeds"] - ref.inputs_embeds.numpy()).max() <= 1e-4
    for k in ("attention_mask", "position_ids", "spatial_mask"):
        np.testing.assert_array_equal(feeds[k], getattr(ref, k).numpy())


def test_identity_artifact_matches_unpruned_adapter(identity_art, adapter):
    rti = load(identity_art)
    assert "decode" not in rti.manifest.graphs
    for case in CASES:
        out = rti.prefill(rti.prepare(_items(case)))
        batch = adapter.prepare(_samples(case))
        with torch.no_grad():
            want = adapter.decoder(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                   position_ids=batch.position_ids).logits[:, -1].numpy()
        assert np.abs(out["logits"] - want).max() <= 1e-4
        np.testing.assert_array_equal(out["logits"].argmax(-1), want.argmax(-1))
    # greedy next token through the public API; more than one token needs the decode graph
    from conftest import hf_greedy_ids as greedy_ids

    ids = greedy_ids(adapter, adapter.prepare(_samples(CASES[0])), max_new_tokens=1)[0]
    rti.generate(SCENES["a"], Q_SHORT, max_new_tokens=1)
    assert rti.last_ids[0] == ids
    with pytest.raises(InputError, match="no decode graph"):
        rti.generate(SCENES["a"], Q_SHORT, max_new_tokens=2)


def test_pruned_artifact_matches_fx_graph(rt, adapter, fx_pruned, schedule):
    from adatoken_compile.compiler.parity import max_abs_diff_valid

    _, pg = fx_pruned
    for case in CASES:
        batch = adapter.prepare(_samples(case))
        got = rt.prefill(rt.prepare(_items(case)))
        want = _fx_outputs(pg, batch)
        d = max_abs_diff_valid(got, want, LAYERS)
        assert d["logits"] <= 1e-4 and d["kv_valid"] <= 1e-4, (case, d)
        for c in range(len(CUTS)):
            np.testing.assert_array_equal(got[f"kept.{c}"], want[f"kept.{c}"])
            np.testing.assert_array_equal(rt.last_kept[c], want[f"kept.{c}"])
        for i in range(LAYERS):
            np.testing.assert_array_equal(got[f"mask.{i}"], want[f"mask.{i}"])
        # per-request KV-cache bytes follow the schedule's arithmetic
        from adatoken_compile.flops import kv_cache_bytes

        kv = rt.kv_cache_bytes()
        for b, n in enumerate(batch.spatial_counts()):
            n_text = batch.lengths()[b] - n
            assert kv[b] == kv_cache_bytes(adapter.arch(), schedule, n, n_text)


def test_generation_matches_torch_reference(rt, adapter, schedule):
    from adatoken_compile.compiler.reference import generate as generate_pruned

    for case in CASES[1:]:
        batch = adapter.prepare(_samples(case))
        want = generate_pruned(adapter.decoder, batch, schedule, max_new_tokens=6, eos_token_id=adapter.eos_token_id)
        texts = rt.generate([SCENES[s] for s, _ in case], [q for _, q in case], max_new_tokens=6)
        assert rt.last_ids == want
        assert texts == [adapter.tokenizer.decode(w).strip() for w in want]
    # stream == generate for one request; sampling is reproducible with a seed
    one = rt.generate(SCENES["a"], Q_SHORT, max_new_tokens=6)
    assert "".join(rt.stream(SCENES["a"], Q_SHORT, max_new_tokens=6)) == one
    s1 = rt.generate(SCENES["a"], Q_SHORT, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    s2 = rt.generate(SCENES["a"], Q_SHORT, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    assert s1 == s2


# ----------------------------------------------------------------------------- torch-free runtime + CLI run


def test_runtime_does_not_import_torch(pruned_art, scene_file):
    code = (
        "import sys\n"
        "from adatoken_compile.runtime import load\n"
        f"rt = load({pruned_art!r})\n"
        f"ans = rt.generate({scene_file!r}, 'what is here?', max_new_tokens=3)\n"
        "assert isinstance(ans, str)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "print('OK', rt.provider)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK CPUExecutionProvider" in r.stdout


def test_cli_run_artifact(pruned_art, scene_file):
    r = subprocess.run([sys.executable, "-m", "adatoken_compile", "run", "--artifact", pruned_art, "--scene", scene_file,
                        "--question", "what is here?", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "question: what is here?" in r.stdout and "answer: " in r.stdout


# ----------------------------------------------------------------------------- integrity


def _copy(src, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(path, fn):
    mp = os.path.join(path, "manifest.json")
    with open(mp) as f:
        m = json.load(f)
    fn(m)
    with open(mp, "w") as f:
        json.dump(m, f)


def test_tampered_and_truncated_files(pruned_art, tmp_path):
    a = _copy(pruned_art, tmp_path, "tampered")
    p = os.path.join(a, "prefill.onnx.data")
    with open(p, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(InputError, match=r"prefill\.onnx\.data: sha256 .*recompile"):
        load(a)
    t = _copy(pruned_art, tmp_path, "truncated")
    p = os.path.join(t, "decode.onnx.data")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    with pytest.raises(InputError, match=r"decode\.onnx\.data: size .*truncated.*recompile"):
        load(t)
    os.remove(os.path.join(t, "decode.onnx.data"))
    with pytest.raises(InputError, match="missing"):
        load(t)


def test_paths_leaving_the_artifact(pruned_art, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(os.path.join(pruned_art, "prefill.onnx"), outside)
    for bad, msg in (("../outside.onnx", r"'\.\.'"), (str(outside), "absolute")):
        a = _copy(pruned_art, tmp_path, f"p{len(msg)}")
        _edit_manifest(a, lambda m: m["graphs"]["prefill"].__setitem__("file", bad))
        with pytest.raises(InputError, match=msg):
            load(a)
        a2 = _copy(pruned_art, tmp_path, f"f{len(msg)}")
        _edit_manifest(a2, lambda m: m["files"].__setitem__(bad, {"sha256": "0", "size": 0}))
        with pytest.raises(InputError, match=msg):
            load(a2)
    # a symlink inside ART pointing outside it
    s = _copy(pruned_art, tmp_path, "symlink")
    os.remove(os.path.join(s, "prefill.onnx"))
    os.symlink(str(outside), os.path.join(s, "prefill.onnx"))
    with pytest.raises(InputError, match="outside the artifact"):
        load(s)


def test_external_data_location_outside(pruned_art, tmp_path):
    import onnx

    a = _copy(pruned_art, tmp_path, "extdata")
    shutil.copy(os.path.join(a, "prefill.onnx.data"), tmp_path / "prefill.onnx.data")
    path = os.path.join(a, "prefill.onnx")
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../prefill.onnx.data"
    onnx.save(m, path)
    _edit_manifest(a, lambda man: man["files"]["prefill.onnx"].update(sha256=sha256_file(path), size=os.path.getsize(path)))
    with pytest.raises(InputError, match="external-data location '../prefill.onnx.data' points outside"):
        load(a)


def test_bad_manifest(pruned_art, tmp_path):
    a = _copy(pruned_art, tmp_path, "badformat")
    _edit_manifest(a, lambda m: m.__setitem__("version", 99))
    with pytest.raises(InputError, match="version 99"):
        load(a)
    with pytest.raises(InputError, match="not found"):
        load(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- compile failures


def _leftovers(parent):
    return sorted(os.listdir(parent))


def test_schedule_for_another_model_refused(adapter, tmp_path):
    out = tmp_path / "art"
    other = Schedule(cuts=list(CUTS), num_layers=LAYERS, fingerprint="sha256:" + "0" * 64, family="llava3d")
    with pytest.raises(ScheduleMismatch, match="calibrated on model"):
        compile_artifact(adapter, other, str(out), progress=False)
    same = dict(fingerprint=adapter.fingerprint(), family="llava3d")
    with pytest.raises(ScheduleMismatch, match="6-layer"):
        compile_artifact(adapter, Schedule(cuts=[], num_layers=6, **same), str(out), progress=False)
    with pytest.raises(ScheduleMismatch, match="llava-hf model, this model is llava3d"):
        compile_artifact(adapter, Schedule(cuts=[], num_layers=LAYERS, **{**same, "family": "llava-hf"}), str(out),
                         progress=False)
    with pytest.raises(ScheduleMismatch, match="names no model fingerprint"):
        compile_artifact(adapter, Schedule(cuts=[], num_layers=LAYERS, family="llava3d"), str(out), progress=False)
    assert _leftovers(tmp_path) == []


def test_failed_compile_leaves_nothing(adapter, tmp_path, monkeypatch):
    calls = []

    def failing_export(module, args, dyn, path, *a, **k):
        calls.append(path)
        with open(path, "wb") as f:  # a partial file in the temp dir
            f.write(b"partial")
        raise RuntimeError("export exploded")

    monkeypatch.setattr(art_mod, "export", failing_export)
    with pytest.raises(RuntimeError, match="exploded"):
        compile_artifact(adapter, identity(LAYERS, fingerprint=adapter.fingerprint(), family="llava3d"),
                         str(tmp_path / "art"), progress=False)
    assert calls and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- input errors


def test_input_errors(rt):
    bad = simple_scene()
    bad.depths = bad.depths.astype(np.float64)
    with pytest.raises(InputError, match="'depths' has dtype float64"):
        rt.generate(bad, Q_SHORT, max_new_tokens=1)
    with pytest.raises(InputError, match="takes scenes; got an image array"):
        rt.prepare([(SCENES["a"], Q_SHORT), (np.zeros((8, 8, 3), np.uint8), Q_SHORT)])
    feeds = rt.prepare(_items(CASES[0]))
    n = int(feeds["attention_mask"].sum())
    no_spatial = dict(feeds, spatial_mask=np.zeros_like(feeds["spatial_mask"]))
    with pytest.raises(InputError, match="0 spatial tokens"):
        rt.prefill(no_spatial)
    saved = rt.max_positions
    try:
        rt.max_positions = n - 1
        with pytest.raises(InputError, match="exceeds the model's max_position_embeddings"):
            rt.generate(SCENES["a"], Q_SHORT, max_new_tokens=1)
        rt.max_positions = n + 2
        with pytest.raises(InputError, match=r"max_new_tokens \(5\) exceeds"):
            rt.generate(SCENES["a"], Q_SHORT, max_new_tokens=5)
    finally:
        rt.max_positions = saved


# ----------------------------------------------------------------------------- CLI diff


def test_cli_diff_two_cuts(tiny3d_dir, schedule_file, fx_pruned):
    from adatoken_compile.passes.graph_diff import diff_graphs

    res = CliRunner().invoke(cli_main, ["diff", "--model", tiny3d_dir, "--schedule", schedule_file])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    got: dict = {}
    cut = None
    for ln in lines:
        if ln.startswith("cut "):
            cut = int(ln.split()[1].rstrip(":"))
            got[cut] = {"roles": set(), "rewired": []}
        elif ln.strip().startswith("+ "):
            got[cut]["roles"].add(ln.split("role=")[1].split()[0])
        elif ln.strip().startswith("~ "):
            got[cut]["rewired"].append(ln.strip()[2:])
    base = {"score", "select", "idx", "valid", "len", "kept_positions", "rebuild_mask", "gather_seq", "gather_hidden"}
    assert sorted(got) == [0, 1]
    assert got[0]["roles"] == base | {"valid0", "n0", "gather_spatial"}
    assert got[1]["roles"] == base
    gm, pg = fx_pruned
    for d in diff_graphs(gm, pg):
        assert got[d.cut]["rewired"] == [f"{r.consumer}.{r.arg}: {r.old} -> {r.new}" for r in d.rewired]
        assert f"output[kept.{d.cut}].args[0][{13 + d.cut}]: None -> adatoken_cut{d.cut}_kept_positions" in got[d.cut]["rewired"]
        assert sum("scaled_dot_product_attention" in r and "rebuild_mask" in r for r in got[d.cut]["rewired"]) == (2 if d.cut == 0 else 1)


# ----------------------------------------------------------------------------- HF LLaVA


@pytest.mark.parametrize("decoder,kv_heads", [("llama", None), ("qwen2", 2)])
def test_hf_llava_artifact_matches_adapter(decoder, kv_heads, tmp_path):
    from adatoken_compile.models.llava_hf import LlavaHFAdapter
    from adatoken_compile.models.testing import random_llava_hf
    from adatoken_compile.compiler.reference import pruned_prefill

    d = random_llava_hf(str(tmp_path / f"hf_{decoder}"), decoder=decoder, layers=2, kv_heads=kv_heads)
    ad = LlavaHFAdapter(d)
    sch = Schedule(cuts=[Cut(1, 0.5)], num_layers=2, fingerprint=ad.fingerprint(), family=ad.family)
    out = str(tmp_path / "art")
    compile_artifact(ad, sch, out, progress=False, decode=False)
    r = load(out)
    assert set(r.manifest.graphs) == {"encoder", "prefill"}
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (70, 90, 3), dtype=np.uint8), rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)]
    qs = [Q_SHORT, Q_LONG]
    assert np.abs(r.encode_image(imgs[0]) - ad.spatial_tokens(imgs[0]).numpy()).max() <= 1e-4
    batch = ad.prepare([Sample(question=q, image=im) for im, q in zip(imgs, qs)])
    got = r.prefill(r.prepare(list(zip(imgs, qs))))
    ref = pruned_prefill(ad.decoder, batch, sch)
    assert np.abs(got["logits"] - ref.logits_last.numpy()).max() <= 1e-4
    np.testing.assert_array_equal(got["kept.0"], ref.kept_indices[0].numpy())
    with pytest.raises(InputError, match="takes images|takes an image"):
        r.prepare([(SCENES["a"], Q_SHORT)])


def test_reuse_copies_the_schedule_free_graphs(adapter, schedule, identity_art, pruned_art, tmp_path):
    """A compile that borrows the identity artifact's encoder and decode graphs writes those files
    byte for byte and prefills exactly as the artifact compiled from scratch."""
    out = str(tmp_path / "reused")
    man = compile_artifact(adapter, schedule, out, progress=False, reuse=identity_art)
    ident = load(identity_art).manifest
    assert "decode" in man.graphs and "decode" not in ident.graphs  # what the lender lacks is exported
    for name in ("encoder", "projector"):
        f = man.graphs[name]["file"]
        assert sha256_file(os.path.join(out, f)) == sha256_file(os.path.join(identity_art, ident.graphs[name]["file"]))
    feeds = load(pruned_art).prepare([(simple_scene(), "what color is the box?")])
    a, b = load(out).prefill(feeds), load(pruned_art).prefill(feeds)
    np.testing.assert_array_equal(a["kept.0"], b["kept.0"])
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)
    other = str(tmp_path / "other-model")
    shutil.copytree(identity_art, other)
    _edit_manifest(other, lambda m: m["model"].update(fingerprint="sha256:" + "0" * 64))
    with pytest.raises(InputError, match="another model"):
        compile_artifact(adapter, schedule, str(tmp_path / "refused"), progress=False, reuse=other)
    assert not os.path.exists(tmp_path / "refused")
