"""Question files -> samples (torch-free).

Accepted forms (see docs/data.md):

* JSONL, one object a line: ``question`` (required), ``id``, ``scene`` (a scene path relative to
  the file, or a scene id under ``--scenes``), ``scene_id``, ``image`` (a path relative to the
  file, HF LLaVA; a list of paths for several images in one prompt), ``frames`` (a list of frame
  paths: one video, after the images if both are given) with ``fps`` (their sampling rate, default
  2), ``answers`` (list) or ``answer``, ``type``;
* ScanQA v1.0 JSON: a list of ``{"question_id", "scene_id", "question", "answers"?, ...}``;
* SQA3D: a list (or ``{"questions": [...]}``) of ``{"question_id", "scene_id", "situation",
  "question", "answers"?, "question_type"?}``; the text asked is ``situation + " " + question``;
* LLaVA-3D's question files: a list of ``{"question_id", "video": "scannet/<scene_id>", "text"}``.

Answers are a list of strings or of ``{"answer": ...}`` objects; none is needed (calibration only
needs scenes and questions). Scene ids resolve under ``--scenes`` (:func:`..scenes.find_scene`).

Samples come scene by scene, in the order each scene first appears in the file, each scene's
questions in file order (so a scene is decoded once, and ``start_scene`` skips whole scenes);
the order depends on the file alone, so shards can split the list by index.
"""

from __future__ import annotations

import json
import os
import re

from adatoken_compile.runtime.sources import ImageRef, SceneRef, find_scene, split_key
from adatoken_compile.errors import InputError
from adatoken_compile.readers import MAX_DATA_JSON_ENV, max_data_json_bytes, parse_json_text, read_bytes, regular_file
from adatoken_compile.runtime.sample import Sample, Video

FIX = "see docs/data.md (question files)"


def _read_items(path: str) -> list[tuple[str, dict]]:
    """(where, object) per question of the file."""
    raw = read_bytes(path, "question file", f"{FIX}, or set {MAX_DATA_JSON_ENV} (megabytes) to raise the limit", max_data_json_bytes())
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; a question file is JSONL or JSON ({FIX})") from None
    if path.endswith(".jsonl"):
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = parse_json_text(line, f"{path}:{n}", "question", "JSONL holds one object per line")
            except InputError as e:
                raise InputError(str(e).replace(": not valid JSON", ": not a JSON object", 1)) from None
            items.append((f"{path}:{n}", obj))
        return items
    data = parse_json_text(text, path, "question file", f"pass JSONL (one object a line) or a JSON list ({FIX})")
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        data = data["questions"]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of questions (ScanQA / SQA3D) or {{\"questions\": [...]}}; {FIX}")
    return [(f"{path}: item {i}", obj) for i, obj in enumerate(data)]


def _answers(obj: dict, where: str) -> list[str]:
    raw = obj.get("answers", obj.get("answer"))
    if raw is None:
        return []
    if isinstance(raw, (str, int, float)):
        raw = [raw]
    if not isinstance(raw, list):
        raise InputError(f"{where}: 'answers' must be a list of strings; {FIX}")
    out = []
    for a in raw:
        if isinstance(a, dict):
            a = a.get("answer")
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise InputError(f"{where}: 'answers' must be strings (or {{\"answer\": ...}} objects); {FIX}")
        out.append(str(a))
    return out


def _inside(value: str, where: str, what: str) -> None:
    """A question file names what it asks about inside the folders the user gave (the file's own
    folder, --scenes): an absolute path, a drive, a home folder or a '..' component would read
    elsewhere, so each is refused rather than followed."""
    parts = re.split(r"[\\/]", value)
    if "\x00" in value:
        raise InputError(f"{where}: {what} {value!r} holds a NUL character; {FIX}")
    if os.path.isabs(value) or value.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", value):
        raise InputError(f"{where}: {what} '{value}' is an absolute path; name it relative to the question file or "
                         f"as an id under --scenes ({FIX})")
    if ".." in parts:
        raise InputError(f"{where}: {what} '{value}' holds a '..' component, which leads outside the question file's "
                         f"folder and --scenes; name it inside them ({FIX})")


class _Resolver:
    """Scene and image references, one object per distinct path (samples of one scene share it)."""

    def __init__(self, path: str, scenes: str | None, depth_scale: float | None):
        self.base = os.path.dirname(os.path.abspath(path))
        self.scenes = scenes
        self.depth_scale = depth_scale
        self.refs: dict[str, object] = {}
        if scenes is not None and not os.path.exists(scenes):
            raise InputError(f"--scenes {scenes}: not found; pass the folder holding the scene folders (or an info .json)")

    def scene(self, value: str, by_id: bool, where: str) -> tuple[str, SceneRef]:
        _inside(value, where, "scene")
        path = None
        if not by_id:
            p = os.path.join(self.base, value)
            if os.path.exists(split_key(p)[0]):
                path = p
        if path is None:
            if self.scenes is None:
                raise InputError(f"{where}: scene '{value}' is not a path next to the question file; pass "
                                 "--scenes ROOT (the folder holding the scene folders, or an info .json)")
            path = find_scene(self.scenes, value, where)
        if path not in self.refs:
            self.refs[path] = SceneRef(path, self.depth_scale)
        return path, self.refs[path]

    def video_file(self, value: str, where: str) -> str:
        _inside(value, where, "video")
        p = os.path.join(self.base, value)
        if not os.path.isfile(p):
            raise InputError(f"{where}: video '{value}' not found (paths are relative to the question file)")
        return p

    def image(self, value: str, where: str) -> tuple[str, ImageRef]:
        _inside(value, where, "image")
        p = os.path.join(self.base, value)
        if p not in self.refs:
            if not os.path.isfile(p):
                raise InputError(f"{where}: image '{value}' not found (paths are relative to the question file)")
            self.refs[p] = ImageRef(p)
        return p, self.refs[p]


def read_questions(path: str, scenes: str | None = None, depth_scale: float | None = None) -> list[Sample]:
    """Every question of the file at ``path`` as a :class:`Sample` (scenes and images not yet read)."""
    if os.path.lexists(path):
        regular_file(path, "question file", FIX)  # a device, FIFO or folder: said as such, not "not found"
    if not os.path.isfile(path):
        raise InputError(f"{path}: question file not found; pass --data FILE (.jsonl, ScanQA/SQA3D .json) or "
                         "builtin:<split>")
    res = _Resolver(path, scenes, depth_scale)
    groups: dict[str, list[Sample]] = {}
    for index, (where, obj) in enumerate(_read_items(path)):
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object with a 'question'; {FIX}")
        q = obj.get("question", obj.get("text"))
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{where}: no 'question' text; every question needs one ({FIX})")
        if isinstance(obj.get("situation"), str) and obj["situation"].strip():
            q = f"{obj['situation'].strip()} {q.strip()}"
        scene_val = obj.get("scene")
        scene_id = obj.get("scene_id", obj.get("video"))
        image_val, frames_val = obj.get("image"), obj.get("frames")
        if (image_val is not None or frames_val is not None) and (scene_val is not None or scene_id is not None):
            raise InputError(f"{where}: give a scene or images / frames, not both")
        scene = image = None
        if image_val is not None or frames_val is not None:
            found = []
            if image_val is not None:
                paths = image_val if isinstance(image_val, list) and image_val else [image_val]
                if not all(isinstance(v, str) for v in paths):
                    raise InputError(f"{where}: 'image' must be a path string, or a list of them (several images in "
                                     "one prompt, for models that take them)")
                found = [res.image(v, where) for v in paths]
            if frames_val is not None:
                if isinstance(frames_val, str) and frames_val:  # a video file, sampled at fps
                    vkey = source = res.video_file(frames_val, where)
                elif not isinstance(frames_val, list) or not frames_val or not all(isinstance(v, str) for v in frames_val):
                    raise InputError(f"{where}: 'frames' must be a list of frame paths (one video, in time order), "
                                     "or a video file's path")
                else:
                    frames = [res.image(v, where) for v in frames_val]
                    vkey, source = "|".join(k for k, _ in frames), [ref for _, ref in frames]
                fps = obj.get("fps", 2.0)
                if isinstance(fps, bool) or not isinstance(fps, (int, float)):
                    raise InputError(f"{where}: 'fps' must be a number > 0 (the frames' sampling rate)")
                try:
                    video = Video(source, fps)
                except InputError as e:
                    raise InputError(f"{where}: {e}") from None
                found.append(("video:" + vkey, video))
            key = found[0][0] if len(found) == 1 else "|".join(k for k, _ in found)
            image = found[0][1] if len(found) == 1 else [ref for _, ref in found]
        elif scene_val is not None or scene_id is not None:
            val = scene_val if scene_val is not None else scene_id
            if not isinstance(val, str) or not val.strip():
                raise InputError(f"{where}: 'scene' / 'scene_id' must be a non-empty string")
            key, scene = res.scene(val, by_id=scene_val is None, where=where)
        else:
            raise InputError(f"{where}: no 'scene', 'scene_id', 'image' or 'frames'; each question needs what it asks "
                             "about")
        answers = _answers(obj, where)
        kind = obj.get("type", obj.get("kind", obj.get("question_type")))
        qid = obj.get("id", obj.get("question_id"))
        meta = {"id": qid if qid is not None else index, "scene_id": scene_id if scene_id is not None else scene_val,
                "answers": answers, "source": path, "index": index, "scene_key": key}
        groups.setdefault(key, []).append(Sample(question=q.strip(), scene=scene, image=image,
                                                 answer=answers[0] if answers else None,
                                                 kind=None if kind is None else str(kind), meta=meta))
    if not groups:
        raise InputError(f"{path}: holds no questions; {FIX}")
    return [s for g in groups.values() for s in g]


def write_scanqa(path: str, rows: list[dict]) -> None:
    """A ScanQA v1.0-form question file (``question_id``, ``scene_id``, ``question``, ``answers``,
    ``object_ids``, ``object_names``; ``type`` added when known)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
