"""The user's data: scene folders (ScanNet export, EmbodiedScan info files), question files, frame
selection, the checkpoint's image processing, the field's answer metrics, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from adatoken_compile.cli import main
from adatoken_compile.data import iter_samples, load_samples
from adatoken_compile.runtime import scannet
from adatoken_compile.data.questions import read_questions
from adatoken_compile.runtime.sources import DataWarning, SceneRef, open_scene, select_frames
from adatoken_compile.errors import InputError
from adatoken_compile.evaluation.accuracy import score
from adatoken_compile.evaluation.metrics import answer_match, caption_scores, clean_answer, ptb_tokens
from adatoken_compile.runtime.sample import Sample
from adatoken_compile.runtime.image import ImageProcessing
from adatoken_compile.runtime.scene import Scene, load_scene, preprocess_scene

SEED = 2_000_000


def _cli(args):
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """One procedural scene as a .npz, a ScanNet folder (PNG) and an EmbodiedScan folder (JPEG q100)."""
    d = tmp_path_factory.mktemp("twins")
    for args in (["--out", str(d / "s.npz")],
                 ["--format", "scannet", "--out", str(d / "scans" / "room"), "--questions", str(d / "q.json")],
                 ["--format", "embodiedscan", "--image-format", "jpg", "--out", str(d / "es")]):
        r = _cli(["make-scene", "--seed", str(SEED), *args])
        assert r.exit_code == 0, r.output
    return d


# ----------------------------------------------------------------------------- scene layouts

def test_layouts_load_to_the_arrays_of_their_npz_twin(twins):
    npz = load_scene(str(twins / "s.npz"))
    for path, decoded in ((twins / "scans" / "room", None),
                          (twins / "es", sorted((twins / "es" / "posed_images").glob("*/*.jpg")))):
        s = open_scene(str(path), num_frames=npz.num_views)
        want = npz.images if decoded is None else np.stack([np.asarray(Image.open(p).convert("RGB")) for p in decoded])
        assert np.array_equal(s.images, want)  # colour: exactly what Pillow decodes
        assert decoded is None or 0 < np.abs(s.images.astype(int) - npz.images).max() <= 8  # JPEG q100: close, not equal
        # depth: millimetres in the PNG, so half a millimetre (plus float32 rounding) off at most
        assert s.depths.dtype == np.float32 and np.abs(s.depths - npz.depths).max() <= 0.0005 + 1e-6
        assert np.array_equal(s.poses, npz.poses) and np.array_equal(s.intrinsics, npz.intrinsics)


def test_make_scene_writes_a_scanqa_question_file(twins):
    rows = json.loads((twins / "q.json").read_text())
    assert rows and all(r["scene_id"] == "room" and r["answers"] for r in rows)
    samples = load_samples(str(twins / "q.json"), scenes=str(twins / "scans"))
    builtin = load_samples("builtin:test", limit=len(rows))
    assert [(s.question, s.answer, s.kind) for s in samples] == [(s.question, s.answer, s.kind) for s in builtin]
    assert len({id(s.scene) for s in samples}) == 1 and isinstance(samples[0].scene, SceneRef)


def _scan(root, n, *, H=6, W=8, bad_pose=(), no_depth=(), bad_color=(), align=None):
    """A small synthetic ScanNet export folder with ``n`` frames."""
    rng = np.random.default_rng(0)
    for d in ("color", "depth", "pose", "intrinsic"):
        os.makedirs(root / d)
    K = np.array([[5.0, 0, 4, 0], [0, 5, 3, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.savetxt(root / "intrinsic" / "intrinsic_depth.txt", K)
    for i in range(n):
        if i in bad_color:
            (root / "color" / f"{i}.jpg").write_bytes(b"not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "color" / f"{i}.jpg", quality=100)
        if i not in no_depth:
            Image.fromarray(np.full((H, W), 1000 + i, np.uint16)).save(root / "depth" / f"{i}.png")
        P = np.eye(4)
        P[0, 3] = i
        if i in bad_pose:
            P[:] = -np.inf
        np.savetxt(root / "pose" / f"{i}.txt", P)
    if align is not None:
        (root / f"{root.name}.txt").write_text("axisAlignment = " + " ".join(map(str, align.ravel())) + "\n")
    return root


def test_frame_selection_follows_llava3d():
    assert select_frames(300, 20) == list(range(0, 300, 15))
    assert select_frames(45, 20) == list(range(0, 40, 2))  # stride 45 // 20 = 2 from the first
    assert select_frames(20, 20) == list(range(20))
    assert select_frames(3, 7) == [0, 1, 2, 0, 1, 2, 0]  # fewer: the list repeated


def test_scan_folder_skips_invalid_frames_with_one_warning_and_aligns_poses(tmp_path):
    A = np.eye(4)
    A[:3, 3] = [1.0, 2.0, 3.0]
    root = _scan(tmp_path / "scene0000_00", 12, bad_pose={1, 5}, no_depth={2}, align=A)
    with pytest.warns(DataWarning, match=r"skipped 3 frame\(s\) \(2 with an inf/nan pose, 1 without a depth map"):
        s = open_scene(str(root), num_frames=4)
    valid = [0, 3, 4, 6, 7, 8, 9, 10, 11]  # stride 9 // 4 = 2 over the valid frames, from the first
    assert [round(x - 1.0) for x in s.poses[:, 0, 3]] == [valid[i] for i in (0, 2, 4, 6)]
    np.testing.assert_array_equal(s.poses[:, 1:3, 3], np.tile([2.0, 3.0], (4, 1)))  # axis_align @ cam2world
    assert np.allclose(s.depths[:, 0, 0], [1.0 + valid[i] / 1000 for i in (0, 2, 4, 6)])
    with pytest.warns(DataWarning):
        assert open_scene(str(root), num_frames=4, depth_scale=500).depths[0, 0, 0] == np.float32(2.0)


def test_only_the_selected_frames_are_decoded(tmp_path, monkeypatch):
    root = _scan(tmp_path / "scan", 300)
    opened = []
    real = Image.open
    monkeypatch.setattr(scannet.Image, "open", lambda p, *a, **k: opened.append(os.path.basename(str(p))) or real(p, *a, **k))
    s = open_scene(str(root), num_frames=20)
    assert s.num_views == 20 and len(opened) == 40  # 20 colour + 20 depth of 300 frames
    assert {f"{i}.jpg" for i in range(0, 300, 15)} == {f for f in opened if f.endswith(".jpg")}


def test_unreadable_selected_frame_is_skipped_and_too_few_is_refused(tmp_path):
    root = _scan(tmp_path / "scan", 4, bad_color={2})
    with pytest.warns(DataWarning, match="1 unreadable colour image"):
        assert open_scene(str(root), num_frames=4).num_views == 3
    root = _scan(tmp_path / "allbad", 3, bad_pose={0, 1, 2})
    with pytest.raises(InputError, match=r"allbad: none of its 3 frames has a finite pose and a depth map \(3 with an "
                                         r"inf/nan pose\)"):
        open_scene(str(root))


def test_depth_maps_smaller_than_colour_use_the_depth_intrinsics():
    """ScanNet: 1296x968 colour, 640x480 depth. The depth map is resized on its own grid (short side
    to the crop, long side rounded down, Pillow's rounding of the crop box) and its intrinsics follow."""
    rng = np.random.default_rng(0)
    K = np.array([[577.6, 0, 318.9, 0], [0, 578.7, 242.7, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    s = Scene(rng.integers(0, 255, (2, 968, 1296, 3), dtype=np.uint8), rng.uniform(0.5, 4, (2, 480, 640)).astype(np.float32),
              np.tile(np.eye(4), (2, 1, 1)), np.tile(K, (2, 1, 1)))
    pre = preprocess_scene(s, 336)
    assert pre.pixel_values.shape == (2, 3, 336, 336) and pre.depths.shape == (2, 336, 336)
    # 640x480 -> 448x336, crop 56 px each side (LLaVA-3D's numbers for ScanNet at 336)
    np.testing.assert_allclose(pre.intrinsics[0, 0, 0], 577.6 * 448 / 640)
    np.testing.assert_allclose(pre.intrinsics[0, 0, 2], 318.9 * 448 / 640 - 56)
    np.testing.assert_allclose(pre.intrinsics[0, 1, 2], 242.7 * 336 / 480)
    src = s.depths[0, int((0 + 0.5) * 480 / 336), int((56 + 0.5) * 640 / 448)]
    assert pre.depths[0, 0, 0] == src


# ----------------------------------------------------------------------------- image processing

@pytest.mark.parametrize("kind", ["clip", "clip-larger-resize", "siglip"])
def test_image_processing_equals_transformers_for_every_size(kind):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    S = 56
    hf, ours = {
        "clip": (CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S}),
                 ImageProcessing.clip(S)),
        "clip-larger-resize": (CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": S, "width": S}),
                               ImageProcessing(shortest_edge=64, crop_hw=(S, S))),
        "siglip": (SiglipImageProcessorPil(size={"height": S, "width": S}),
                   ImageProcessing(resize_hw=(S, S), mean=(0.5,) * 3, std=(0.5,) * 3)),
    }[kind]
    rng = np.random.default_rng(0)
    # long sides that round up differ from int(): 50 * 56 / 33 = 84.8 -> 84; odd crops; smaller than the crop
    for h, w in ((33, 50), (50, 33), (57, 91), (113, 60), (56, 56), (300, 171), (5, 7), (241, 320)):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        want = hf(img, return_tensors="np")["pixel_values"][0]
        assert np.array_equal(ours(img), want), (h, w)


def test_image_processing_from_a_checkpoint_config(tmp_path):
    from adatoken_compile.models.checkpoint import image_processing
    from adatoken_compile.models.testing import preprocessor_config

    for kind, want in (("clip", ImageProcessing.clip(56)),
                       ("siglip", ImageProcessing(resize_hw=(56, 56), mean=(0.5,) * 3, std=(0.5,) * 3))):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(56, kind)))
        assert image_processing(str(tmp_path), 56) == want
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "LlavaNextImageProcessor"}))
    with pytest.raises(InputError, match="preprocessor_config.json: image_processor_type 'LlavaNextImageProcessor' unsupported"):
        image_processing(str(tmp_path), 56)


# ----------------------------------------------------------------------------- question files

def test_question_file_forms_and_scene_order(tmp_path, twins):
    scans = str(twins / "scans")
    forms = {
        "a.jsonl": "\n".join(json.dumps(x) for x in [
            {"id": "x", "scene": "s.npz", "question": "q1", "answers": ["a", "b"], "type": "t"},
            {"scene_id": "room", "question": "q2"},
            {"scene": "s.npz", "question": "q3", "answer": "c"}]),
        "scanqa.json": json.dumps([{"question_id": "s-1", "scene_id": "room", "question": "q1",
                                    "answers": ["brown chair"], "object_ids": [1], "object_names": ["chair"]}]),
        "sqa3d.json": json.dumps({"questions": [{"question_id": 7, "scene_id": "room", "situation": "I sit.",
                                                 "question": "what is left?", "question_type": 2,
                                                 "answers": [{"answer": "door"}]}]}),
        "llava3d.json": json.dumps([{"question_id": 3, "video": "scannet/room", "text": "what is here?"}]),
    }
    shutil.copy(twins / "s.npz", tmp_path / "s.npz")  # scene paths are relative to the question file
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
    s = read_questions(str(tmp_path / "a.jsonl"), scenes=scans)
    # scene by scene in order of first appearance: q3 joins q1's scene
    assert [x.question for x in s] == ["q1", "q3", "q2"] and s[0].scene is s[1].scene is not s[2].scene
    assert s[0].meta["answers"] == ["a", "b"] and s[0].answer == "a" and s[0].kind == "t" and s[2].answer is None
    assert [x.question for x in iter_samples(str(tmp_path / "a.jsonl"), scenes=scans, start_scene=1)] == ["q2"]
    q = read_questions(str(tmp_path / "sqa3d.json"), scenes=scans)[0]
    assert q.question == "I sit. what is left?" and q.meta["answers"] == ["door"] and q.kind == "2"
    q = read_questions(str(tmp_path / "llava3d.json"), scenes=scans)[0]
    assert q.question == "what is here?" and q.scene.path == os.path.join(scans, "room")
    assert read_questions(str(tmp_path / "scanqa.json"), scenes=scans)[0].meta["id"] == "s-1"


def test_scene_ids_resolve_in_an_info_file(tmp_path, twins):
    """An info file as --scenes: a scene id matches the last component of its keys."""
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"scene_id": f"scene{SEED}_00", "question": "q"}) + "\n")
    s = load_samples(str(f), scenes=str(twins / "es" / "embodiedscan_infos.json"))
    assert s[0].scene.path.endswith(f"embodiedscan_infos.json#scannet/scene{SEED}_00")
    assert s[0].scene.load(20).num_views == 20


# ----------------------------------------------------------------------------- metrics

def test_scanqa_normalisation_and_em():
    assert clean_answer("The 2 brown chairs.") == "two brown chairs"
    assert clean_answer("  a TV  ") == "TV" and clean_answer("none") == "zero" and clean_answer("mat2") == "mat"
    assert answer_match("brown chair", ["brown chair", "chair"]) == (1, 1)
    assert answer_match("chair", ["brown chair"]) == (0, 1)  # refined: one contains the other
    assert answer_match("table", ["brown chair"]) == (0, 0)
    samples = [Sample("q", answer="two", kind="count"), Sample("q", kind="what", meta={"answers": ["x", "brown chair"]}),
               Sample("q", kind="what")]  # no answer: answered, not scored
    res = score(samples, ["2", "chair", "table"])
    assert (res["em1"], res["em1_refined"], res["n"], res["questions"]) == (0.5, 1.0, 2, 3)
    assert res["accuracy"] == 0.0  # the benchmark's first-word measure does not read "2" as "two"
    assert res["per_kind"] == {"count": {"accuracy": 0.0, "em1": 1.0, "em1_refined": 1.0, "n": 1},
                               "what": {"accuracy": 0.0, "em1": 0.0, "em1_refined": 1.0, "n": 1}}


def test_ptb_tokens_match_the_java_tokenizer():
    """Outputs of pycocoevalcap's PTBTokenizer (Stanford CoreNLP, Java) on cleaned answers."""
    java = {"it's on the left, near TV": "it 's on the left near tv", "o'clock": "o'clock",
            "twenty-three": "twenty-three", "don't know": "do n't know", "can't": "ca n't",
            "left side: near door": "left side near door", "a - b": "a b", "white    cabinet": "white cabinet",
            "couch 's": "couch 's", "it is 'big'": "it is big", "they're here": "they 're here", "dogs'": "dogs",
            "well-known word's end": "well-known word 's end"}
    assert {k: ptb_tokens(k) for k in java} == java


def test_bleu_and_cider_without_java():
    pytest.importorskip("pycocoevalcap")
    perfect = caption_scores(["brown wooden chair", "white table"], [["brown wooden chair"], ["white table"]])
    worse = caption_scores(["brown chair", "white"], [["brown wooden chair"], ["white table"]])
    assert perfect["cider"] > worse["cider"] > 0 and perfect["bleu4"] > worse["bleu4"]


# ----------------------------------------------------------------------------- one-line errors

def test_bad_inputs_are_one_line_errors(tmp_path, twins):
    (tmp_path / "nocolor").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "scene": "nowhere"}\n{oops\n')
    (tmp_path / "noq.jsonl").write_text('{"scene_id": "room"}\n')
    (tmp_path / "scanqa.json").write_text(json.dumps([{"question_id": 1, "scene_id": "room", "question": "q"}]))
    (tmp_path / "missing_scene.json").write_text(json.dumps([{"scene_id": "gone", "question": "q"}]))
    (tmp_path / "img.jsonl").write_text('{"image": "gone.png", "question": "q"}\n')
    (tmp_path / "info.json").write_text("[1, 2]")
    scan = _scan(tmp_path / "badintr", 2)
    (scan / "intrinsic" / "intrinsic_depth.txt").write_text("1 2 3\n")
    out = tmp_path / "cal"
    cases = [
        (["run", "--scene", str(tmp_path / "nocolor"), "-q", "q"], "nocolor: a folder without color/"),
        (["run", "--scene", str(scan), "-q", "q"], "intrinsic_depth.txt: holds 3 numbers, expected a 4x4"),
        (["run", "--scene", str(tmp_path / "info.json"), "-q", "q"], "info.json: expected an object mapping scene keys"),
        (["run", "--scene", str(twins / "es" / "embodiedscan_infos.json#nope"), "-q", "q"], "no scene 'nope'"),
        (["calibrate", "--out", str(out), "--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not a JSON object"),
        (["calibrate", "--out", str(out), "--data", str(tmp_path / "noq.jsonl")], "noq.jsonl:1: no 'question'"),
        (["calibrate", "--out", str(out), "--data", str(tmp_path / "scanqa.json")], "pass --scenes ROOT"),
        (["calibrate", "--out", str(out), "--data", str(tmp_path / "missing_scene.json"), "--scenes", str(twins / "scans")],
         "scene 'gone' not found under --scenes"),
        (["calibrate", "--out", str(out), "--data", str(twins / "q.json"), "--scenes", str(twins / "scans")],
         "none is left for held-back questions"),  # one scene: the statistics take it
        (["eval", "--data", str(tmp_path / "img.jsonl")], "image 'gone.png' not found"),
        (["eval", "--data", str(tmp_path / "nothing.json")], "no such question file or built-in split"),
        (["eval", "--data", "builtin:test", "--scenes", str(twins / "scans")], "--scenes"),
    ]
    for args, msg in cases:
        r = _cli(args)
        shown = r.output.rsplit("\r", 1)[-1]  # what a terminal shows once eval's progress bar is cleared
        assert r.exit_code == 2 and shown.startswith("error: ") and shown.strip().count("\n") == 0, (args, r.output)
        assert msg in shown, (msg, r.output)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".cal")]


def test_make_scene_refuses_to_overwrite_what_it_did_not_write(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    r = _cli(["make-scene", "--format", "scannet", "--out", str(d)])
    assert r.exit_code == 2 and "not an adatoken-compile" in r.output and (d / "notes.txt").read_text() == "keep"
