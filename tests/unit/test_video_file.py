"""Video files for Qwen2.5-VL: which frames are sampled (the video processor's rule), decoding
them as transformers' PyAV reader does, and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from adatoken_compile.errors import InputError
from adatoken_compile.runtime.qwen_vision import decode_video, read_frames, sample_frame_indices
from adatoken_compile.runtime.sample import Video
from conftest import write_video

pytest.importorskip("av")


@pytest.mark.parametrize("total, rate, fps, want", [
    (90, 30, 2, [0, 15, 30, 45, 60, 75]),  # 3 s at 2 frames a second
    (13, 12, 2, [0, 3, 6, 9]),  # 2.2 frames asked: at least 4
    (3, 30, 2, [0, 1]),  # shorter than 4 frames: whole temporal patches of what there is
    (1, 30, 2, []),  # shorter than one temporal patch
    (2000, 10, 5, None),  # 1,000 asked: at most 768
])
def test_sampled_frames_follow_the_video_processors_rule(total, rate, fps, want):
    got = sample_frame_indices(total, rate, fps, temporal_patch_size=2)
    if want is None:
        assert len(got) == 768 and got[0] == 0 and got[-1] == int(767 * 2000 / 768)
    else:
        assert got.tolist() == want


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 5000), rate=st.floats(1, 120), fps=st.floats(0.1, 30), T=st.sampled_from([1, 2, 3]))
def test_sampled_frames_are_whole_temporal_patches_in_order(total, rate, fps, T):
    got = sample_frame_indices(total, rate, fps, temporal_patch_size=T)
    assert len(got) % T == 0 and len(got) <= min(768, total)
    assert len(got) >= min(4 // T * T, total // T * T)  # at least 4 frames (in whole patches) where there are
    assert np.all(np.diff(got) > 0) and (len(got) == 0 or (got[0] == 0 and got[-1] < total))


def test_decoded_frames_are_transformers_pyav_frames(tmp_path):
    from transformers.video_utils import read_video_pyav

    rng = np.random.default_rng(0)
    frames = [np.repeat(np.repeat(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), 4, 0), 4, 1) for _ in range(13)]
    path = write_video(tmp_path / "clip.mp4", frames, fps=12)
    got = decode_video(path, fps=2, temporal_patch_size=2)
    want, meta = read_video_pyav(path, lambda metadata, **_: sample_frame_indices(
        metadata.total_num_frames, metadata.fps, 2, 2))
    assert len(got.frames) == 4 and all(np.array_equal(a, b) for a, b in zip(got.frames, want))
    assert got.fps == pytest.approx(meta.sampled_fps) and got.fps == pytest.approx(4 / 13 * 12)
    nearest = [int(np.argmin([np.abs(g.astype(int) - f).mean() for f in frames])) for g in got.frames]
    assert nearest == [0, 3, 6, 9]  # lossy, but each decoded frame is its source frame
    assert read_frames(Video(path), None, 2).fps == got.fps  # a file's video read as its frames


def test_bad_video_files_are_one_line(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    one = write_video(tmp_path / "one.mp4", [np.zeros((16, 16, 3), np.uint8)], fps=12)
    for path, what in ((tmp_path / "none.mp4", "no such video file"), (tmp_path / "notes.mp4", "not a readable video"),
                       (one, "1 frames, fewer than one temporal patch of 2")):
        with pytest.raises(InputError, match=rf"^{path}: {what}") as e:
            decode_video(str(path), 2.0, 2)
        assert "\n" not in str(e.value)


def test_a_question_files_frames_may_name_a_video_file(tmp_path):
    from adatoken_compile.data.questions import read_questions

    write_video(tmp_path / "clip.mp4", [np.zeros((16, 16, 3), np.uint8)] * 4)
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "what moves?", "frames": "clip.mp4", "fps": 1}) + "\n")
    [s] = read_questions(str(q))
    assert isinstance(s.image, Video) and s.image.frames == str(tmp_path / "clip.mp4") and s.image.fps == 1.0
    q.write_text(json.dumps({"question": "what moves?", "frames": "gone.mp4"}) + "\n")
    with pytest.raises(InputError, match=r"video 'gone.mp4' not found \(paths are relative to the question file\)"):
        read_questions(str(q))
