"""Qwen2.5-VL inputs in numpy (runtime/qwen_vision.py, the ``mrope`` position layout) against
transformers' own definitions, and several images per question in a question file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adatoken_compile.data.questions import read_questions
from adatoken_compile.errors import InputError
from adatoken_compile.runtime.positions import LAYOUTS
from adatoken_compile.runtime.qwen_vision import (QwenImageProcessing, prompt_for_images, rotary_ids, smart_resize,
                                                  token_coordinates, window_order)
from adatoken_compile.runtime.sample import Video

GRIDS = [(1, 10, 14), (1, 4, 6), (1, 22, 2), (2, 8, 8), (1, 36, 52)]


@pytest.mark.parametrize("hw", [(150, 203), (61, 97), (300, 33), (4000, 30), (20, 20), (1080, 1920)])
def test_smart_resize_is_transformers(hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    for lo, hi in ((28 * 28 * 4, 28 * 28 * 64), (56 * 56, 28 * 28 * 1280)):
        got = smart_resize(*hw, 28, lo, hi)
        assert got == theirs(*hw, factor=28, min_pixels=lo, max_pixels=hi)
        # the area stays under max_pixels unless the short side is already at its minimum (one factor)
        assert got[0] % 28 == 0 and got[1] % 28 == 0 and (got[0] * got[1] <= hi or min(got) == 28)


def test_an_image_too_elongated_is_one_line():
    with pytest.raises(InputError, match=r"^image: 30x9000 pixels has an aspect ratio over 200"):
        smart_resize(9000, 30, 28, 3136, 50176)


@pytest.mark.parametrize("grid", GRIDS)
def test_window_and_rotary_ids_are_transformers(grid):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    g = torch.tensor([grid])
    want_order, want_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=112, patch_size=14)
    order, sizes = window_order(grid, 2, 112 // 28)
    assert np.array_equal(order, want_order.numpy())
    assert np.array_equal(np.concatenate([[0], np.cumsum(sizes * 4)]), want_cu.numpy())
    assert np.array_equal(rotary_ids(grid, 2), get_vision_position_ids(g, 2).numpy())


def test_encoder_feeds_permute_by_window_and_unpermute_back():
    proc = QwenImageProcessing(min_pixels=3136, max_pixels=50176)
    img = np.random.default_rng(0).integers(0, 255, (150, 203, 3), dtype=np.uint8)
    pix, grid = proc.patches(img)
    feeds = proc.encoder_feeds(pix, grid)
    assert feeds["pixel_values"].shape == pix.shape and sorted(map(tuple, feeds["pixel_values"])) == sorted(map(tuple, pix))
    # four windows of up to 4x4 merged tokens over a 5x7 grid, each patch in one
    assert np.bincount(feeds["window_ids"]).tolist() == [64, 48, 16, 12]
    merged = np.arange(35)[window_order(grid, 2, 4)[0]]
    assert np.array_equal(proc.unpermute(merged, grid), np.arange(35))


def test_mrope_positions_by_hand():
    """Left-padded row: 2 text tokens, a 2x3 image (t, h, w), 1 text token, a 3x1 image, 1 text."""
    am = np.array([[0] + [1] * 15], np.int64)
    sm = np.array([[0, 0, 0] + [1] * 6 + [0] + [1] * 3 + [0, 0, 0]], bool)[:, :16]
    xyz = np.zeros((1, 16, 3), np.float32)
    xyz[0, 3:9] = [(0, h, w) for h in range(2) for w in range(3)]
    xyz[0, 10:13] = [(0, h, 0) for h in range(3)]
    layout = LAYOUTS["mrope"]
    want = np.array([[1, 0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 6, 6, 9, 10, 11],
                     [1, 0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7, 8, 9, 10, 11],
                     [1, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 6, 6, 9, 10, 11]])[:, None, :]
    assert np.array_equal(layout.prefill(am, sm, xyz), want)
    assert layout.start(am, sm, xyz).tolist() == [12]  # not the row's length, 15
    assert np.array_equal(layout.decode(layout.start(am, sm, xyz), 3), np.full((3, 1, 1), 15))
    with pytest.raises(InputError, match="without their \\(t, h, w\\) coordinates"):
        layout.prefill(am, sm)


def test_mrope_video_time_runs_past_the_text_by_hand():
    """A video of 3 temporal patches of 1x2 tokens at t steps of 2: the text after it goes on past
    its rows and columns (start + 2), the decode start past its largest t (start + 4 + 1)."""
    am = np.ones((1, 9), np.int64)
    sm = np.array([[0] + [1] * 6 + [0, 0]], bool)
    xyz = np.zeros((1, 9, 3), np.float32)
    xyz[0, 1:7] = token_coordinates((3, 2, 4), 2, time_interval=2.0)
    assert xyz[0, 1:7, 0].tolist() == [0, 0, 2, 2, 4, 4]
    layout = LAYOUTS["mrope"]
    want = np.array([[0, 1, 1, 3, 3, 5, 5, 3, 4],
                     [0, 1, 1, 1, 1, 1, 1, 3, 4],
                     [0, 1, 2, 1, 2, 1, 2, 3, 4]])[:, None, :]
    assert np.array_equal(layout.prefill(am, sm, xyz), want)
    assert layout.start(am, sm, xyz).tolist() == [6]
    # transformers truncates t * interval in float32: 1/3 steps give 0, 0, 0, 1
    assert token_coordinates((4, 2, 2), 2, time_interval=float(np.float32(4) * np.float32(2 / 24)))[:, 0].tolist() \
        == [0, 0, 0, 1]


def test_a_model_without_video_refuses_a_video_in_one_line():
    proc = QwenImageProcessing(min_pixels=3136, max_pixels=50176)
    frames = [np.zeros((56, 56, 3), np.uint8)] * 2
    with pytest.raises(InputError, match=r"^video: this model takes no video"):
        proc.encode(Video(frames), lambda feeds: None)
    with_video = QwenImageProcessing(min_pixels=3136, max_pixels=50176, tokens_per_second=2)
    assert QwenImageProcessing.from_dict(with_video.to_dict()) == with_video
    assert with_video.time_interval(Video(frames)) == 2.0 and with_video.time_interval(Video(frames, fps=1)) == 4.0


def test_prompt_repeats_the_image_unit():
    unit = "<|vision_start|><image><|vision_end|>"
    fmt = f"<|im_start|>user\n{unit}{{question}}<|im_end|>"
    assert prompt_for_images(fmt, 2, unit) == f"<|im_start|>user\n{unit}{unit}{{question}}<|im_end|>"
    with pytest.raises(InputError):
        prompt_for_images(fmt, 0, unit)


def test_a_question_file_names_several_images(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(tmp_path / f"v{i}.png")
    rows = [{"question": "which view shows the chair?", "image": ["v0.png", "v1.png"]},
            {"question": "what is here?", "image": "v2.png"},
            {"question": "and here?", "image": ["v0.png", "v1.png"]}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = read_questions(str(tmp_path / "q.jsonl"))
    assert [s.question for s in got] == ["which view shows the chair?", "and here?", "what is here?"]
    assert isinstance(got[0].image, list) and len(got[0].image) == 2 and not isinstance(got[2].image, list)
    assert got[0].image[1].load().shape == (21, 30, 3)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x", "image": ["v0.png", 3]}))
    with pytest.raises(InputError, match="'image' must be a path string, or a list of them"):
        read_questions(str(tmp_path / "bad.jsonl"))


def test_a_question_file_names_a_video_by_its_frames(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"f{i}.png")
    rows = [{"question": "what moves?", "frames": ["f0.png", "f1.png", "f2.png"], "fps": 4},
            {"question": "and with this view?", "image": "f0.png", "frames": ["f1.png", "f2.png"]}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = read_questions(str(tmp_path / "q.jsonl"))
    assert isinstance(got[0].image, Video) and len(got[0].image.frames) == 3 and got[0].image.fps == 4
    assert got[0].image.frames[2].load().shape == (20, 30, 3)
    assert not isinstance(got[1].image[0], Video) and got[1].image[1].fps == 2.0  # images first, then the video
    for bad, msg in (({"frames": 3}, "'frames' must be a list of frame paths .*, or a video file's path"),
                     ({"frames": ["f0.png"], "fps": "fast"}, "'fps' must be a number > 0"),
                     ({"frames": ["f0.png"], "fps": -1}, r"video: fps -1(\.0)? must be a number > 0"),
                     ({"frames": ["f0.png"], "scene": "s.npz"}, "give a scene or images / frames, not both")):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x", **bad}))
        with pytest.raises(InputError, match=msg):
            read_questions(str(tmp_path / "bad.jsonl"))


def test_an_image_past_the_pixel_limit_is_refused_before_it_is_resized():
    proc = QwenImageProcessing(min_pixels=3136, max_pixels=50176)
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (3000, 3000, 3))  # no memory behind it
    with pytest.raises(InputError, match=r"^view 2: 3000x3000 pixels, more than the limit of \d+; downscale it"):
        proc.patches(huge, "view 2")
    with pytest.raises(InputError, match=r"expected \(H,W,3\) uint8 RGB"):
        proc.patches(np.zeros((20, 20), np.uint8))


@pytest.mark.parametrize("key,value", [("min_pixels", "many"), ("max_pixels", 0), ("merge_size", None),
                                       ("window_size", 100), ("mean", [0.5, 0.5])])
def test_a_malformed_qwen_image_processing_setting_is_one_line(key, value):
    from adatoken_compile.runtime.image import processing_from_dict

    good = QwenImageProcessing(min_pixels=3136, max_pixels=50176).to_dict()
    assert processing_from_dict(good, "art/preprocess.json") == QwenImageProcessing(min_pixels=3136, max_pixels=50176)
    with pytest.raises(InputError) as e:
        processing_from_dict({**good, key: value}, "art/preprocess.json")
    assert str(e.value).startswith("art/preprocess.json: ") and "\n" not in str(e.value)
