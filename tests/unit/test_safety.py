"""Bad input never becomes a traceback, a silent wrong answer or lost data: the strict readers, the
output rules of adatoken_compile.io, schedule and settings parsing, scene geometry and limits.
Property tests (hypothesis) generate the inputs; every case ends in an InputError of one line or
in a value that is exactly what was given."""

from __future__ import annotations

import errno
import json
import math
import os
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from adatoken_compile import io as aio
from adatoken_compile.errors import InputError, ScheduleMismatch
from adatoken_compile.readers import Fields, read_json, read_npz
from adatoken_compile.runtime.image import ImageProcessing
from adatoken_compile.runtime.prompt import PROMPTS, check_question
from adatoken_compile.runtime.sampling import check_sampling
from adatoken_compile.runtime.scene import (LIMIT_ENV, Scene, load_scene, unproject_patches, validate_scene,
                                            voxelize)
from adatoken_compile.runtime.settings import read_settings
from adatoken_compile.schedule import SCHEMA, Cut, Schedule

from conftest import simple_scene

# fixed examples in CI (derandomize) and no example database written into the checkout
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                               max_size=3), max_leaves=6)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert isinstance(e, InputError) and isinstance(e, ValueError), type(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def leftovers(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if ".tmp-" in n)


# ----------------------------------------------------------------------------- strict JSON


@FAST
@given(value=JSON)
def test_fields_take_exact_types_only(value):
    f = Fields({"k": value}, "f.json", "fix it")
    for get, ok in ((lambda: f.integer("k", lo=1), isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                    (lambda: f.number("k", lo=0.0, hi=1.0, lo_open=True),
                     isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1),
                    (lambda: f.string("k"), isinstance(value, str) and value != "")):
        if ok:
            assert get() == value and type(get()) in (type(value), float)
        else:
            with pytest.raises(InputError) as e:
                get()
            msg = one_line(e.value)
            assert msg.startswith("f.json: 'k' must be") and msg.endswith("; fix it")


@pytest.mark.parametrize("raw, what", [(None, "not found"), ("DIR", "is a directory"), (b"\xff\xfe{}", "not UTF-8"),
                                       (b'{"a": NaN}', "not valid JSON"), (b"{", "not valid JSON"),
                                       (b"[1]", "must be an object"), (b"[" * 100_000, "nested too deeply|not valid")])
def test_read_json_refuses_each_malformed_file_in_one_line(tmp_path, raw, what):
    p = tmp_path / "x.json"
    if raw == "DIR":
        p.mkdir()
    elif raw is not None:
        p.write_bytes(raw)
    with pytest.raises(InputError, match=what) as e:
        read_json(str(p), "config", "fix it")
    assert one_line(e.value).startswith(str(p))


def test_read_npz_checks_declared_sizes_and_reads_only_named_members(tmp_path, monkeypatch):
    p = str(tmp_path / "a.npz")
    np.savez_compressed(p, small=np.arange(4, dtype=np.int64), bomb=np.zeros(50_000_000, np.uint8),
                        obj=np.array([{}], dtype=object))
    assert os.path.getsize(p) < 200_000  # 50 MB of zeros compress to almost nothing
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(getattr(name, "filename", name))
                        or real_open(self, name, *a, **k))
    got = read_npz(p, {"small": 32, "missing": 8}, "fix")
    assert got["small"].tolist() == [0, 1, 2, 3] and got["missing"] is None and opened == ["small.npy"]
    with pytest.raises(InputError, match="'bomb' declares 50000128 bytes, over the limit of 1000000") as e:
        read_npz(p, {"bomb": 1_000_000}, "fix")
    one_line(e.value)
    assert "bomb.npy" not in opened  # refused from the zip directory, never decompressed
    with pytest.raises(InputError, match="Python objects"):
        read_npz(p, {"obj": 1000}, "fix")


# ----------------------------------------------------------------------------- outputs


def _own_dir(path, kind="artifact", files=None):
    """A genuine output of ``kind`` written through atomic_dir (an artifact's manifest lists its files)."""
    files = {"schedule.json": b"{}", "sub/w.bin": b"\x00\x01"} if files is None else files
    with aio.atomic_dir(path, kind, overwrite=True) as tmp:
        for rel, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(data)
        if kind == "artifact":
            table = aio.file_record(tmp)
            table.pop(aio._TEMP_MARKER, None)
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump({"format": "adatoken-compile/artifact", "files": table}, f)


def _snapshot(d) -> dict:
    out = {}
    for dp, dns, fns in os.walk(d):
        for n in fns + [x for x in dns if os.path.islink(os.path.join(dp, x))]:
            full = os.path.join(dp, n)
            out[os.path.relpath(full, d)] = (os.readlink(full) if os.path.islink(full) else
                                             open(full, "rb").read() if os.path.isfile(full) else "special")
    return out


def test_output_rules_never_touch_what_the_tool_did_not_write(tmp_path):
    user = tmp_path / "notes"
    user.mkdir()
    (user / "mine.txt").write_text("keep")
    (tmp_path / "file.txt").write_text("keep")
    cases = [(str(user), "artifact", True, "not an adatoken-compile artifact"),
             (str(tmp_path / "file.txt"), "artifact", True, "not a directory this tool wrote"),
             (str(tmp_path / "file.txt"), "scene", True, "not an adatoken-compile scene file"),
             (str(tmp_path / "file.txt" / "sub"), "artifact", True, "parent .* is a file"),
             (str(user), "predictions", True, "is a directory")]
    for path, kind, over, msg in cases:
        with pytest.raises(InputError, match=msg) as e:
            aio.check_output(path, kind, overwrite=over, is_dir=kind in ("artifact", "calibration"))
        one_line(e.value)
    own = str(tmp_path / "art")
    _own_dir(own)
    with pytest.raises(InputError, match="pass --overwrite"):
        aio.check_output(own, "artifact")
    with pytest.raises(InputError, match="not an adatoken-compile calibration"):  # same tool, other kind
        aio.check_output(own, "calibration", overwrite=True)
    assert aio.check_output(own, "artifact", overwrite=True) == own
    (tmp_path / "empty").mkdir()
    assert aio.check_output(str(tmp_path / "empty"), "artifact") == str(tmp_path / "empty")
    assert (user / "mine.txt").read_text() == "keep" and (tmp_path / "file.txt").read_text() == "keep"


def test_scene_files_are_replaced_only_when_make_scene_wrote_them(tmp_path):
    p = str(tmp_path / "s.npz")
    simple_scene(V=1, H=8, W=8).save(p)  # a valid scene, but a user's (no mark)
    with pytest.raises(InputError, match="not an adatoken-compile scene file"):
        aio.check_output(p, "scene", overwrite=True, is_dir=False)
    aio.mark_scene(p)
    assert load_scene(p).num_views == 1  # the mark leaves the arrays as they were
    with pytest.raises(InputError, match="no record of one"):  # a zip comment anyone can copy is no proof
        aio.check_output(p, "scene", overwrite=True, is_dir=False)
    aio.write_file_record(p, "scene")
    with pytest.raises(InputError, match="pass --overwrite"):
        aio.check_output(p, "scene", is_dir=False)
    assert aio.check_output(p, "scene", overwrite=True, is_dir=False)


def test_failed_or_refused_writes_keep_the_earlier_output_and_leave_nothing(tmp_path):
    own = str(tmp_path / "art")
    _own_dir(own)
    before = sorted(os.listdir(own))
    with pytest.raises(InputError, match="No space left on device") as e:
        with aio.atomic_dir(own, "artifact", overwrite=True) as tmp:
            open(os.path.join(tmp, "big"), "w").close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert "nothing was changed" in one_line(e.value)
    with pytest.raises(KeyboardInterrupt):
        with aio.atomic_dir(own, "artifact", overwrite=True):
            raise KeyboardInterrupt
    assert sorted(os.listdir(own)) == before and leftovers(tmp_path) == []
    # another run filled the (empty) target while this one worked: its output is not replaced
    os.makedirs(tmp_path / "race")
    with pytest.raises(InputError, match="written by something else"):
        with aio.atomic_dir(str(tmp_path / "race"), "artifact"):
            _own_dir(str(tmp_path / "race" / "inner"))
            os.replace(tmp_path / "race" / "inner" / "manifest.json", tmp_path / "race" / "manifest.json")
    assert os.path.exists(tmp_path / "race" / "manifest.json") and leftovers(tmp_path) == []
    with pytest.raises(InputError, match="No space left"):
        with aio.atomic_file(str(tmp_path / "p.json"), "predictions") as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert leftovers(tmp_path) == [] and not os.path.exists(tmp_path / "p.json")


def test_interrupt_cleanup_removes_temps_and_restores_an_output_set_aside(tmp_path):
    own = str(tmp_path / "art")
    _own_dir(own)
    aside = str(tmp_path / ".art.tmp-1-ab")
    os.replace(own, aside)  # what atomic_dir does just before renaming the replacement in
    tmp = str(tmp_path / ".art.tmp-1-cd")
    os.makedirs(tmp)
    aio._live_temps.update({aside: own, tmp: None})
    aio.remove_live_temps()
    assert "manifest.json" in os.listdir(own) and aio.owned_by_tool(own, "artifact")
    assert leftovers(tmp_path) == [] and not aio._live_temps


def test_stale_temps_of_dead_runs_are_cleaned_others_kept(tmp_path):
    dead = 2**22 + 12345  # above pid_max's default: no such process
    final = str(tmp_path / "art")
    stale = tmp_path / f".art.tmp-{dead}-aa"
    stale.mkdir()
    (stale / aio._TEMP_MARKER).write_text(aio._temp_record(stale.name))
    alive = tmp_path / f".art.tmp-{os.getppid()}-bb"
    alive.mkdir()
    (alive / aio._TEMP_MARKER).write_text(aio._temp_record(alive.name))
    copied = tmp_path / f".art.tmp-{dead}-ee"  # a marker copied from another temporary path is no proof
    copied.mkdir()
    (copied / aio._TEMP_MARKER).write_text(aio._temp_record(stale.name))
    (tmp_path / f".art.tmp-{dead}-ff").write_text("a user's file named like a temporary")
    users = tmp_path / f".art.tmp-{dead}-cc"  # a user's folder of that name, without the marker
    users.mkdir()
    (users / "mine.txt").write_text("keep")
    _own_dir(str(tmp_path / f".art.tmp-{dead}-dd"))  # an earlier output set aside by a killed run
    removed = aio.clean_stale_temps(final)
    assert sorted(os.path.basename(p) for p in removed) == [stale.name, f".art.tmp-{dead}-dd"]
    assert aio.owned_by_tool(final, "artifact")  # put back in place: nothing had replaced it
    assert alive.exists() and (users / "mine.txt").read_text() == "keep" and copied.exists()
    assert (tmp_path / f".art.tmp-{dead}-ff").exists()


# Ownership by proof: whatever a user's folder holds (a copied manifest, schedule or marker among
# their own files), and however an earlier output was changed after the tool wrote it, --overwrite
# replaces only an untouched output of the same kind; everything else is one line and left as it was.
DIR_KINDS = ("artifact", "calibration", "checkpoint", "quickstart", "scenes", "comparison")
NAMES = st.text(st.sampled_from("abcxyz._-"), min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
CONTENT = st.binary(max_size=16)


def _copied_record(kind: str) -> tuple[str, bytes]:
    if kind == "artifact":
        return "manifest.json", json.dumps({"format": "adatoken-compile/artifact", "files": {}}).encode()
    if kind == "calibration-schedule":
        return "schedule.json", json.dumps({"schema": SCHEMA}).encode()
    return aio.MARKER, json.dumps({"tool": aio.TOOL, "kind": kind}).encode()


@settings(FAST, max_examples=40)
@given(user=st.dictionaries(NAMES, CONTENT, min_size=1, max_size=4),
       record=st.sampled_from(DIR_KINDS + ("calibration-schedule", None)), kind=st.sampled_from(DIR_KINDS))
def test_a_users_folder_with_a_copied_record_is_never_replaced(tmp_path_factory, user, record, kind):
    d = tmp_path_factory.mktemp("user") / "project"
    d.mkdir()
    for n, data in user.items():
        (d / n).write_bytes(data)
    if record is not None:
        name, data = _copied_record(record)
        (d / name).write_bytes(data)
    before = _snapshot(d)
    with pytest.raises(InputError, match="nothing was changed") as e:
        with aio.atomic_dir(str(d), kind, overwrite=True) as tmp:
            open(os.path.join(tmp, "new"), "w").close()
    one_line(e.value)
    assert _snapshot(d) == before and leftovers(d.parent) == []


MUTATIONS = ("add", "add_nested", "edit", "delete", "symlink", "fifo", "other_kind", "none")


@settings(FAST, max_examples=40)
@given(kind=st.sampled_from(DIR_KINDS), mutation=st.sampled_from(MUTATIONS), name=NAMES, data=CONTENT)
def test_an_earlier_output_is_replaced_only_untouched_and_of_the_same_kind(tmp_path_factory, kind, mutation, name, data):
    d = tmp_path_factory.mktemp("out") / "o"
    _own_dir(str(d), kind)
    target_kind = kind
    if mutation == "add":
        (d / f"user-{name}").write_bytes(data)
    elif mutation == "add_nested":
        (d / "sub" / f"user-{name}").write_bytes(data)
    elif mutation == "edit":
        (d / "sub" / "w.bin").write_bytes(b"edited:" + data)
    elif mutation == "delete":
        os.remove(d / "sub" / "w.bin")
    elif mutation == "symlink":
        os.symlink("/etc", d / f"user-{name}")
    elif mutation == "fifo":
        os.mkfifo(d / f"user-{name}")
    elif mutation == "other_kind":
        target_kind = next(k for k in DIR_KINDS if k != kind)
    before = _snapshot(d)
    if mutation == "none":
        assert aio.owned_by_tool(str(d), kind)
        with aio.atomic_dir(str(d), kind, overwrite=True) as tmp:
            open(os.path.join(tmp, "fresh"), "w").close()
        assert "fresh" in os.listdir(d) and aio.owned_by_tool(str(d), kind)
        return
    with pytest.raises(InputError, match="nothing was changed") as e:
        aio.check_output(str(d), target_kind, overwrite=True)
    msg = one_line(e.value)
    assert ("user-" in msg) if mutation.startswith("add") or mutation in ("symlink", "fifo") else True
    assert _snapshot(d) == before and leftovers(d.parent) == []


@settings(FAST, max_examples=30)
@given(kind=st.sampled_from(aio.FILE_KINDS), other=st.sampled_from(aio.FILE_KINDS),
       text=st.sampled_from(['[{"question": "q", "prediction": "p"}]', '[]', 'mine']),
       edit=st.booleans())
def test_an_output_file_is_replaced_only_with_its_own_record(tmp_path_factory, kind, other, text, edit):
    d = tmp_path_factory.mktemp("files")
    p = str(d / "out.json")
    with open(p, "w") as f:  # a user's file, however much it looks like this tool's output
        f.write(text)
    with pytest.raises(InputError, match="no record of one") as e:
        aio.check_output(p, kind, overwrite=True, is_dir=False)
    one_line(e.value)
    with pytest.raises(InputError, match="nothing was changed"):  # the user's file is in the way
        aio.write_json(p, [{"question": "q", "prediction": "p"}], kind, overwrite=True)
    assert open(p).read() == text
    os.remove(p)
    aio.write_json(p, [{"question": "q", "prediction": "p"}], kind)
    if edit:
        with open(p, "a") as f:
            f.write(" ")
    if edit or other != kind:
        with pytest.raises(InputError, match="nothing was changed"):
            aio.write_json(p, [], other, overwrite=True)
        assert json.load(open(p)) == [{"question": "q", "prediction": "p"}]
    else:
        aio.write_json(p, [], other, overwrite=True)
        assert json.load(open(p)) == [] and aio.owned_file(p, kind)
    assert leftovers(d) == []


# ----------------------------------------------------------------------------- schedules


def _schedule_dict() -> dict:
    return Schedule([Cut(1, 0.5), Cut(3, 0.25)], 4, policy="adaptive", fingerprint="sha256:" + "a" * 64,
                    family="llava3d").to_dict()


PATHS = [("cuts", 0, "layer"), ("cuts", 0, "keep"), ("cuts", 1), ("cuts",), ("model", "num_layers"),
         ("model", "fingerprint"), ("model", "family"), ("model",), ("cuts", 0, "rule"), ("cuts", 0, "rule", "name"), ("positions",),
         ("version",), ("policy",), ("predicted",), ("calibration",)]


@FAST
@given(path=st.sampled_from(PATHS), value=JSON | st.sampled_from([1.7, True, "0.5", 0, -1, 2, 1e308]),
       delete=st.booleans())
def test_schedule_fields_are_exact_or_refused(path, value, delete):
    d = _schedule_dict()
    node = d
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    try:
        s = Schedule.from_dict(d, where="s.json")
    except InputError as e:
        assert one_line(e).startswith("s.json")
        return
    # accepted: every field is exactly what the file holds (nothing coerced)
    for c, raw in zip(s.cuts, d["cuts"]):
        assert type(c.layer) is int and c.layer == raw["layer"] and not isinstance(raw["keep"], bool)
        assert c.keep == raw["keep"] and 0 < c.keep <= 1
    assert isinstance(s.fingerprint, str) and isinstance(s.family, str) and s.num_layers == d["model"]["num_layers"]


def test_schedule_needs_a_model_to_be_checked_against():
    s = Schedule([Cut(1, 0.5)], 4, fingerprint="sha256:" + "a" * 64, family="llava3d")
    s.check_model("sha256:" + "a" * 64, 4, family="llava3d")
    for kw, msg in (({"fingerprint": None}, "no model fingerprint"), ({"family": None}, "no model family")):
        with pytest.raises(ScheduleMismatch, match=msg):
            Schedule([Cut(1, 0.5)], 4, **{"fingerprint": "sha256:" + "a" * 64, "family": "llava3d", **kw}).check_model(
                "sha256:" + "a" * 64, 4, family="llava3d")
    with pytest.raises(ScheduleMismatch, match="llava3d model, this model is llava-hf"):
        s.check_model("sha256:" + "a" * 64, 4, family="llava-hf")
    assert _schedule_dict()["schema"] == SCHEMA


# ----------------------------------------------------------------------------- artifact settings


def _settings() -> dict:
    return {"family": "llava3d", "input": "scene", "image_size": 56, "patch_size": 14, "mean": [0.5] * 3,
            "std": [0.25] * 3, "prompt": {"format": PROMPTS["llava_v1"]("{question}"), "question_field": "{question}"},
            "bos_id": 1, "eos_id": 2, "max_positions": 4096, "voxel_size": 0.2, "max_tokens": 2560,
            "image_processing": ImageProcessing.clip(56, [0.5] * 3, [0.25] * 3).to_dict(), "num_frames": 20,
            "arch": {"num_layers": 4, "hidden": 64, "heads": 4, "kv_heads": 4, "head_dim": 16, "intermediate": 128,
                     "vocab": 252}}


@FAST
@given(key=st.sampled_from(["input", "image_size", "patch_size", "mean", "std", "prompt", "eos_id", "max_positions",
                            "voxel_size", "max_tokens", "arch", "family", "image_processing", "num_frames"]),
       value=JSON | st.sampled_from([[0, 0, 0], [1, 1, float("inf")], 0, -3, "56", True, 0.0]))
def test_artifact_settings_exact_or_refused(tmp_path_factory, key, value):
    d = _settings()
    d[key] = value
    p = tmp_path_factory.mktemp("s") / "preprocess.json"
    p.write_text(json.dumps(d))
    try:
        got = read_settings(str(p), "recompile")
    except InputError as e:
        assert one_line(e).startswith(str(p))
        return
    assert all(s > 0 and math.isfinite(s) for s in got["std"]) and got["image_size"] >= got["patch_size"] >= 1
    assert got["voxel_size"] > 0 and type(got["max_tokens"]) is int
    proc = ImageProcessing.from_dict(got["image_processing"])  # what the runtime builds from it
    assert proc.std is None or all(s > 0 and math.isfinite(s) for s in proc.std)
    assert got["num_frames"] is None or (type(got["num_frames"]) is int and got["num_frames"] >= 1)


@settings(FAST, max_examples=40)
@given(key=st.sampled_from(["max_positions", "arch.num_layers", "arch.hidden", "arch.heads", "arch.kv_heads",
                            "arch.head_dim", "arch.intermediate", "arch.vocab", "image_processing.resample",
                            "image_processing.shortest_edge"]),
       value=st.integers((1 << 24) + 1, 10**400) | st.integers(-10**400, 0))
def test_artifact_numbers_that_size_work_are_bounded(tmp_path_factory, key, value):
    """A stored description may not size KV buffers, loops or a resize beyond any model's: every
    such number outside its limit is one line when the artifact is read, not an allocation."""
    d = _settings()
    where = d
    *path, last = key.split(".")
    for k in path:
        where = where[k]
    where[last] = value
    p = tmp_path_factory.mktemp("s") / "preprocess.json"
    p.write_text(json.dumps(d))
    with pytest.raises(InputError) as e:
        got = read_settings(str(p), "recompile")
        ImageProcessing.from_dict(got["image_processing"])
    assert len(one_line(e.value)) < 600


# ----------------------------------------------------------------------------- scenes


def _arrays(**over):
    s = simple_scene(V=2, H=24, W=32)
    a = {"images": s.images, "depths": s.depths, "poses": s.poses.copy(), "intrinsics": s.intrinsics.copy()}
    a.update(over)
    return a


finite_or_not = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -1.0, 1e-300, 1e300, 1e30])


@settings(FAST, max_examples=80)
@given(fx=finite_or_not, fy=finite_or_not, cx=finite_or_not, t=finite_or_not, depth=finite_or_not,
       rot=st.sampled_from(["ok", "zero", "scale", "mirror"]))
def test_scene_geometry_gives_finite_separate_voxels_or_one_line_error(fx, fy, cx, t, depth, rot):
    a = _arrays()
    K, P = a["intrinsics"], a["poses"]
    K[0, 0, 0], K[0, 1, 1], K[0, 0, 2], P[1, 0, 3] = fx, fy, cx, t
    P[0, :3, :3] = {"ok": np.eye(3), "zero": np.zeros((3, 3)), "scale": 2 * np.eye(3), "mirror": np.diag([1, 1, -1])}[rot]
    with np.errstate(all="ignore"):
        a["depths"] = (a["depths"] * np.float32(depth if math.isfinite(depth) else 1.0)).astype(np.float32)
        if not math.isfinite(depth):
            a["depths"][0, 0, 0] = depth
    try:
        scene = validate_scene(a, name="s.npz")
    except InputError as e:
        assert one_line(e).startswith("s.npz")
        return
    xyz = unproject_patches(scene.depths, scene.intrinsics, scene.poses, 8).reshape(-1, 3)
    assert np.isfinite(xyz).all()
    vm = voxelize(xyz)
    span = xyz.max(0) - xyz.min(0)
    assert vm.num_tokens >= 1 and (vm.num_tokens > 1 or span.max() < 0.4)  # never everything in one token


def test_scene_limits_are_enforced_and_overridable(monkeypatch, tmp_path):
    with pytest.raises(InputError, match=f"3 views, more than the limit of 2; .*{LIMIT_ENV['views']}"):
        monkeypatch.setenv(LIMIT_ENV["views"], "2")
        validate_scene(_arrays(images=np.zeros((3, 24, 32, 3), np.uint8), depths=np.ones((3, 24, 32), np.float32),
                               poses=np.tile(np.eye(4), (3, 1, 1)), intrinsics=np.tile(np.eye(4), (3, 1, 1)) * 20))
    monkeypatch.setenv(LIMIT_ENV["view_pixels"], "100")
    with pytest.raises(InputError, match="views of 24x32 pixels, more than the limit of 100"):
        validate_scene(_arrays())
    monkeypatch.setenv(LIMIT_ENV["view_pixels"], "many")
    with pytest.raises(InputError, match="ADATOKEN_COMPILE_MAX_VIEW_PIXELS='many': must be a whole number"):
        validate_scene(_arrays())
    monkeypatch.delenv(LIMIT_ENV["view_pixels"])
    monkeypatch.delenv(LIMIT_ENV["views"])
    # 400 one-pixel views: a tiny file, but 400 encoder images; refused by the limit's default
    p = str(tmp_path / "tiny_views.npz")
    Scene(np.zeros((400, 1, 1, 3), np.uint8), np.ones((400, 1, 1), np.float32), np.tile(np.eye(4), (400, 1, 1)),
          np.tile(np.eye(4), (400, 1, 1)) * 20).save(p)
    assert os.path.getsize(p) < 20_000
    with pytest.raises(InputError, match="400 views, more than the limit of 64"):
        load_scene(p)


def test_load_scene_ignores_extra_members_and_refuses_oversized_ones(tmp_path):
    s = simple_scene(V=1, H=8, W=8)
    p = str(tmp_path / "s.npz")
    np.savez_compressed(p, images=s.images, depths=s.depths, poses=s.poses, intrinsics=s.intrinsics,
                        unused=np.zeros(100_000_000, np.uint8))
    assert load_scene(p).num_views == 1  # the 100 MB member is never decompressed
    np.savez_compressed(p, images=np.zeros((1, 3000, 3000, 3), np.uint8), depths=s.depths, poses=s.poses,
                        intrinsics=s.intrinsics)
    with pytest.raises(InputError, match="views of 3000x3000 pixels, more than the limit"):
        load_scene(p)  # refused from the member's header
    with zipfile.ZipFile(p, "w") as z:  # a member whose zip entry declares more than the limits allow
        with z.open("images.npy", "w", force_zip64=True) as f:
            f.write(b"\0" * 16)
        z.getinfo("images.npy").file_size = 1 << 40
    with pytest.raises(InputError) as e:
        load_scene(p)
    assert one_line(e.value).startswith(p)


# ----------------------------------------------------------------------------- questions, sampling


@FAST
@given(q=st.text(max_size=40) | st.sampled_from(["", "   ", "a\x00b", "what \udcff?", "x <image> y", 5, None, b"q"]))
def test_questions_are_valid_text_or_refused(q):
    try:
        out = check_question(q)
    except InputError as e:
        one_line(e)
        return
    assert out == q and q.strip() and "<image>" not in q
    q.encode("utf-8")


@pytest.mark.parametrize("t, p, seed", [(float("nan"), 1.0, None), (-1, 1.0, None), (0.5, 0.0, 0), (0.5, 1.5, 0),
                                        (True, 1.0, None), (0.5, 1.0, -1), (0.5, 1.0, 1.5), ("0.5", 1.0, None)])
def test_sampling_settings_refused(t, p, seed):
    with pytest.raises(InputError) as e:
        check_sampling(t, p, seed)
    one_line(e.value)


# ----------------------------------------------------------------------------- question files stay inside


PART = st.sampled_from(["..", ".", "room", "scannet", "outside", "secret", "x y", ""])
PREFIX = st.sampled_from(["", "/", "~/", "C:/", "\\\\", "./"])


@settings(FAST, max_examples=80)
@given(prefix=PREFIX, parts=st.lists(PART, min_size=1, max_size=4), key=st.sampled_from(["scene_id", "scene", "video",
                                                                                          "image"]))
def test_question_files_read_only_inside_the_given_folders(tmp_path_factory, prefix, parts, key):
    """Whatever a question file names, what it reads lies under --scenes or the file's own folder;
    everything else is one line."""
    from adatoken_compile.data.questions import read_questions

    top = tmp_path_factory.mktemp("paths")
    here, scans = top / "here", top / "here" / "scans"
    scans.mkdir(parents=True)
    for d in (scans, here, top):  # a scene of every name at every level, so a lookup outside would succeed
        for name in ("room", "outside", "secret", "scannet", "x y"):
            simple_scene(V=1, H=8, W=8).save(str(d / f"{name}.npz"))
            (d / name).mkdir(exist_ok=True)
            (d / name / "room.npz").write_bytes((d / f"{name}.npz").read_bytes())
    value = prefix + "/".join(parts)
    qf = here / "q.jsonl"
    qf.write_text(json.dumps({"question": "q", key: value}) + "\n")
    try:
        samples = read_questions(str(qf), scenes=str(scans))
    except InputError as e:
        one_line(e)
        return
    ref = samples[0].scene or samples[0].image
    real = os.path.abspath(ref.path)
    allowed = [str(scans)] if key in ("scene_id", "video") else [str(here)]
    assert any(os.path.commonpath([real, a]) == a for a in allowed + [str(scans)]), (value, real)
    assert ".." not in value.replace("\\", "/").split("/") and not os.path.isabs(value)
    if key in ("scene_id", "video"):  # an id: its last component, directly under --scenes (docs/data.md)
        assert os.path.dirname(real) == str(scans)


# ----------------------------------------------------------------------------- bounds before work


def _special(kind: str, where) -> str:
    """A path that is not a regular file of the expected size: a device, a FIFO, a directory,
    a symlink to either, or (``big``) a regular file over the reader's limit."""
    p = str(where / f"special-{kind}")
    if kind == "dev_zero_link":
        os.symlink("/dev/zero", p)
    elif kind == "dev_null_link":
        os.symlink("/dev/null", p)
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "fifo_link":
        os.mkfifo(p + ".target")
        os.symlink(p + ".target", p)
    elif kind == "dir":
        os.mkdir(p)
    elif kind == "dangling":
        os.symlink(p + ".nowhere", p)
    return p


def _readers():
    from adatoken_compile.data.questions import read_questions
    from adatoken_compile.runtime import embodiedscan, scannet
    from adatoken_compile.runtime.image import load_image, open_image

    return {
        "json": lambda p: read_json(p, "config", "fix"),
        "npz": lambda p: read_npz(p, {"a": 100}, "fix"),
        "schedule": lambda p: Schedule.load(p),
        "questions": lambda p: read_questions(p),
        "matrix": lambda p: scannet.read_matrix(p),
        "image": lambda p: load_image(p),
        "frame": lambda p: open_image(p, "colour image"),
        "info": lambda p: embodiedscan.load_info(p),
        "scene": lambda p: load_scene(p),
        "tokenizer": lambda p: __import__("adatoken_compile.runtime.tokenizer", fromlist=["x"]).TextTokenizer.from_files(p),
        "chat_template": _chat_template_at,
        "safetensors": lambda p: __import__("adatoken_compile.models.checkpoint", fromlist=["x"]).load_state_dict([p]),
    }


def _chat_template_at(p):
    """The checkpoint reader's chat template, with ``p`` in the place of chat_template.jinja."""
    from adatoken_compile.models.checkpoint import chat_template

    d = os.path.join(os.path.dirname(p), "ckpt-" + os.path.basename(p))
    os.makedirs(d)
    os.symlink(os.path.abspath(p), os.path.join(d, "chat_template.jinja"))
    if chat_template(d) is None:  # a dangling link is no template: nothing was read, nothing to refuse
        raise InputError(f"{p}: no chat template")


@settings(FAST, max_examples=40)
@given(kind=st.sampled_from(["dev_null_link", "fifo", "fifo_link", "dir", "dangling"]),
       reader=st.sampled_from(sorted(_readers())))
def test_every_reader_refuses_what_is_not_a_regular_file_before_reading(tmp_path_factory, kind, reader):
    import signal

    import adatoken_compile.models.checkpoint  # noqa: F401  (torch's import is not what the alarm times)
    import adatoken_compile.runtime.tokenizer  # noqa: F401

    p = _special(kind, tmp_path_factory.mktemp("special"))
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail(f"{reader} blocked or read without end on {kind}"))
    signal.alarm(30)
    try:
        with pytest.raises(InputError) as e:
            _readers()[reader](p)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    one_line(e.value)


# /dev/zero never ends: a reader that regressed to reading it would take all memory, so every reader
# meets it in a child process whose address space is capped 1 GB above what its imports took
ZERO_CHILD = """
import os, resource, sys
sys.path.insert(0, sys.argv[1])
import test_safety as t
readers = t._readers()
import adatoken_compile.models.checkpoint, adatoken_compile.runtime.tokenizer
vm = int(next(x for x in open("/proc/self/status") if x.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
for name, read in sorted(readers.items()):
    p = os.path.join(sys.argv[2], "zero-" + name)
    os.symlink("/dev/zero", p)
    try:
        read(p)
        print(name, "READ")
    except t.InputError as e:
        print(name, "REFUSED" if "\\n" not in str(e) and "device" in str(e) else "OTHER: " + str(e)[:80])
    except BaseException as e:
        print(name, "CRASH", type(e).__name__)
"""


def test_every_reader_refuses_a_link_to_dev_zero_in_a_memory_capped_child(tmp_path):
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", ZERO_CHILD, here, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(
                           here)), os.path.dirname(here)])})
    got = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.strip())
    assert set(got) == set(_readers()) and set(got.values()) == {"REFUSED"}, (got, r.stderr[-2000:])


@settings(FAST, max_examples=20)
@given(extra=st.integers(1, 5000), reader=st.sampled_from(["json", "matrix"]))
def test_a_file_over_its_readers_limit_is_refused_from_its_size(tmp_path_factory, extra, reader):
    from adatoken_compile import readers
    from adatoken_compile.runtime import scannet

    mp = pytest.MonkeyPatch()  # undone at once: the limits are module constants other tests read
    try:
        mp.setattr(readers, "MAX_JSON_BYTES", 64)
        mp.setattr(scannet, "MAX_MATRIX_BYTES", 64)
        p = tmp_path_factory.mktemp("big") / "f"
        p.write_text(" " * (64 + extra))
        read = {"json": lambda: read_json(str(p), "config", "fix", max_bytes=readers.MAX_JSON_BYTES),
                "matrix": lambda: scannet.read_matrix(str(p))}[reader]
        with pytest.raises(InputError, match="too large") as e:
            read()
        one_line(e.value)
    finally:
        mp.undo()


@settings(FAST, max_examples=30)
@given(H=st.integers(1, 40), W=st.integers(1, 40), depth_too=st.booleans())
def test_scene_frames_over_the_pixel_limit_are_refused_from_their_header(tmp_path_factory, H, W, depth_too):
    """No pixel of an over-limit frame is decoded: the header's size is checked first."""
    from PIL import ImageFile

    from adatoken_compile.runtime import scannet
    from adatoken_compile.runtime.sources import open_scene

    d = tmp_path_factory.mktemp("frames") / "scan"
    scannet.write(simple_scene(V=2, H=H, W=W), str(d), "scan")
    limit = 200
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)

    mp = pytest.MonkeyPatch()
    mp.setenv(LIMIT_ENV["view_pixels"], str(limit))
    mp.setattr(ImageFile.ImageFile, "load", load)
    try:
        if H * W > limit:
            with pytest.raises(InputError, match="more than the limit") as e:
                open_scene(str(d), num_frames=2)
            one_line(e.value)
            assert decoded == []
        else:
            assert open_scene(str(d), num_frames=2).images.shape[1:3] == (H, W)
    finally:
        mp.undo()


@settings(FAST, max_examples=40)
@given(short=st.integers(1, 4), long=st.integers(1, 3000), edge=st.integers(4, 64), tall=st.booleans())
def test_a_resize_target_over_the_limit_is_refused_before_resizing(short, long, edge, tall):
    """A sliver whose short side goes to the tower's size would ask for a resize of long * edge / short
    pixels: refused from the numbers, never allocated."""
    H, W = (long, short) if tall else (short, long)
    proc = ImageProcessing(shortest_edge=edge, crop_hw=(edge, edge))
    nh, nw = proc.resized_hw(H, W)
    mp = pytest.MonkeyPatch()
    mp.setenv(LIMIT_ENV["view_pixels"], "20000")
    try:
        if H * W > 20000:
            pytest.raises(InputError, proc, np.zeros((H, W, 3), np.uint8))
        elif nh * nw > 20000:
            with pytest.raises(InputError, match="resizes to") as e:
                proc(np.zeros((H, W, 3), np.uint8))
            one_line(e.value)
        else:
            assert proc(np.zeros((H, W, 3), np.uint8)).shape == (3, edge, edge)
    finally:
        mp.undo()


@settings(FAST, max_examples=40)
@given(value=st.one_of(st.integers(-10**400, 10**400), st.integers(-5, 100), st.floats(), st.booleans(), st.text(max_size=3),
                       st.none()))
def test_num_frames_is_checked_against_the_views_limit_before_a_frame_is_read(tmp_path_factory, value):
    from adatoken_compile.runtime.sources import check_num_frames, open_scene

    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64
    if ok:
        assert check_num_frames(value, "config.json") == value
        return
    with pytest.raises(InputError, match="num_frames") as e:
        check_num_frames(value, "config.json")
    assert len(one_line(e.value)) < 400
    if value is not None:
        with pytest.raises(InputError, match="num_frames"):
            open_scene(str(tmp_path_factory.mktemp("nf") / "missing"), num_frames=value)


# ----------------------------------------------------------------------------- no silent acceptance


@settings(FAST, max_examples=20)
@given(dtype=st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "bool"]), which=st.sampled_from(["weight", "bias"]),
       on_disk=st.booleans())
def test_integer_weights_are_refused_not_cast(dtype, which, on_disk):
    import torch

    from adatoken_compile.models.checkpoint import OnDisk, assign_exact

    m = torch.nn.Linear(3, 2)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    bad = torch.ones(sd[which].shape, dtype=getattr(torch, dtype))
    sd[which] = OnDisk("w.safetensors", which, bad.shape, {"bool": "BOOL"}.get(dtype, dtype.upper().replace("INT", "I")
                                                                                 .replace("UI", "U"))) if on_disk else bad
    with pytest.raises(InputError, match="not a floating type") as e:
        assign_exact(m, sd, "ckpt", lazy=object())
    one_line(e.value)


def _frame_files(d, depth: np.ndarray):
    from PIL import Image

    c, p = str(d / "c.png"), str(d / "d.tiff")
    Image.fromarray(np.zeros(depth.shape + (3,), np.uint8)).save(c)
    Image.fromarray(depth).save(p)
    return c, p


@settings(FAST, max_examples=25)
@given(metres=st.floats(0.1, 8.0), scale=st.sampled_from([1.0, 1000.0, 5000.0]), floating=st.booleans())
def test_float_depth_maps_are_metres_integer_maps_are_units(tmp_path_factory, metres, scale, floating):
    from collections import Counter

    from adatoken_compile.runtime.scannet import decode_frames

    d = tmp_path_factory.mktemp("depth")
    raw = np.full((4, 5), metres if floating else round(metres * scale), np.float32 if floating else np.int32)
    c, p = _frame_files(d, raw)
    arrays, _ = decode_frames([(c, p, np.eye(4))], [0], scale, "scene", Counter())
    want = np.float32(metres) if floating else np.float32(round(metres * scale)) / np.float32(scale)
    assert arrays["depths"].dtype == np.float32 and np.allclose(arrays["depths"], want)


@settings(FAST, max_examples=30)
@given(value=st.one_of(st.sampled_from([0, 0.0, -1, -1000.0, math.nan, math.inf, -math.inf, True, "1000"]),
                       st.floats(max_value=0.0), st.integers(max_value=0)))
def test_a_non_positive_or_non_finite_depth_scale_is_refused(tmp_path_factory, value):
    from adatoken_compile.runtime import embodiedscan
    from adatoken_compile.runtime.sources import check_depth_scale, open_scene

    with pytest.raises(InputError, match="depth_scale") as e:
        check_depth_scale(value, "depth_scale")
    one_line(e.value)
    d = tmp_path_factory.mktemp("es")
    embodiedscan.write([("scene0", simple_scene(V=1, H=8, W=8))], str(d))
    info = json.load(open(d / "embodiedscan_infos.json"))
    next(iter(info.values()))["depth_scale"] = value
    (d / "embodiedscan_infos.json").write_text(json.dumps(info))
    # the info file's own scale, never "0 means 1000" (NaN and Infinity are not JSON at all)
    with pytest.raises(InputError, match="depth_scale|NaN|Infinity") as e:
        open_scene(str(d / "embodiedscan_infos.json"), num_frames=1)
    one_line(e.value)
    if not isinstance(value, str):
        with pytest.raises(InputError, match="depth_scale"):
            open_scene(str(d / "embodiedscan_infos.json"), num_frames=1, depth_scale=value)


@settings(FAST, max_examples=10)
@given(name=st.text(" \t\n", max_size=3))
def test_an_empty_model_name_is_refused_not_the_bundled_model(name):
    from adatoken_compile import api

    with pytest.raises(InputError, match="empty") as e:
        api.load_model(name)
    one_line(e.value)


@settings(FAST, max_examples=15)
@given(name=st.sampled_from(["vision_tower", "clip", "towers/clip-336"]), in_cwd=st.booleans())
def test_a_vision_tower_is_looked_for_only_where_the_config_says(tmp_path_factory, name, in_cwd):
    from adatoken_compile.models.llava3d import _local_vision_dir

    top = tmp_path_factory.mktemp("vt")
    model_dir, cwd = top / "ckpt", top / "work"
    model_dir.mkdir()
    cwd.mkdir()
    (cwd / name).mkdir(parents=True)  # a tower of that name in the current directory: never taken
    if not in_cwd:
        (model_dir / name).mkdir(parents=True)
    mp = pytest.MonkeyPatch()
    mp.chdir(cwd)
    try:
        if in_cwd:
            with pytest.raises(InputError, match="not a local directory") as e:
                _local_vision_dir(str(model_dir), {"mm_vision_tower": name}, None, "config.json")
            assert str(model_dir / name) in one_line(e.value)
        else:
            assert _local_vision_dir(str(model_dir), {"mm_vision_tower": name}, None, "config.json") == str(model_dir / name)
        assert _local_vision_dir(str(model_dir), {"mm_vision_tower": "x"}, name, "config.json") == name  # the user's own path
    finally:
        mp.undo()


# ----------------------------------------------------------------------------- one line, whatever the input


@settings(FAST, max_examples=40)
@given(offset=st.integers(0, 10**6), byte=st.integers(0, 255), count=st.integers(1, 4))
def test_a_corrupted_scene_npz_is_one_line_or_a_valid_scene(tmp_path_factory, offset, byte, count):
    d = tmp_path_factory.mktemp("npz")
    p = str(d / "s.npz")
    simple_scene(V=1, H=8, W=8).save(p)
    raw = bytearray(open(p, "rb").read())
    for k in range(count):  # corrupt deflate streams, headers and the zip directory alike
        raw[(offset + 97 * k) % len(raw)] = byte
    open(p, "wb").write(bytes(raw))
    try:
        assert load_scene(p).num_views == 1
    except InputError as e:
        one_line(e)


@settings(FAST, max_examples=20)
@given(depth=st.integers(500, 200_000), opener=st.sampled_from(["[", '{"a":']),
       reader=st.sampled_from(["json", "schedule", "questions", "questions_jsonl", "info"]))
def test_deeply_nested_json_is_one_line_in_every_reader(tmp_path_factory, depth, opener, reader):
    from adatoken_compile.data.questions import read_questions
    from adatoken_compile.runtime import embodiedscan

    closer = "]" if opener == "[" else "}"
    d = tmp_path_factory.mktemp("deep")
    p = d / ("q.jsonl" if reader == "questions_jsonl" else "f.json")
    p.write_text(opener * depth + "1" + closer * depth + "\n")
    read = {"json": lambda: read_json(str(p), "config", "fix"), "schedule": lambda: Schedule.load(str(p)),
            "questions": lambda: read_questions(str(p)), "questions_jsonl": lambda: read_questions(str(p)),
            "info": lambda: embodiedscan.load_info(str(p))}[reader]
    try:
        read()
    except InputError as e:
        one_line(e)
    else:  # a nesting the parser handles is valid JSON; only a reader without a shape to check takes it
        assert reader == "json" and opener != "[" and depth < 1000


SCHEDULE_NUMBERS = [("version",), ("model", "num_layers"), ("cuts", 0, "layer"), ("cuts", 0, "keep"),
                    ("cuts", 1, "layer"), ("cuts", 1, "keep")]


@settings(FAST, max_examples=40)
@given(where=st.sampled_from(SCHEDULE_NUMBERS), digits=st.integers(20, 4000), sign=st.sampled_from([1, -1]),
       as_float=st.booleans())
def test_huge_numbers_in_a_schedule_are_one_line(tmp_path_factory, where, digits, sign, as_float):
    d = _schedule_dict()
    obj = d
    for k in where[:-1]:
        obj = obj[k]
    obj[where[-1]] = sign * int("9" * digits)
    text = json.dumps(d)
    if as_float:
        text = text.replace("9" * digits, "9" * digits + ".5", 1)
    p = tmp_path_factory.mktemp("huge") / "schedule.json"
    p.write_text(text)
    with pytest.raises(InputError) as e:
        Schedule.load(str(p))
    assert len(one_line(e.value)) < 600


PREPROCESSOR = st.one_of(
    st.just([]), st.just([1, 2]), st.just("clip"), st.just(None),
    st.fixed_dictionaries({}, optional={
        "resample": st.one_of(st.integers(-3, 120), st.floats(allow_nan=False), st.text(max_size=3), st.booleans()),
        "crop_size": st.one_of(st.integers(-2, 10**7), st.dictionaries(st.sampled_from(["height", "width"]),
                                                                     st.integers(-2, 10**6))),
        "size": st.one_of(st.integers(-2, 10**7), st.dictionaries(st.sampled_from(["shortest_edge", "height", "width"]),
                                                                st.integers(-2, 10**6))),
        "image_mean": st.lists(st.floats(allow_nan=False), max_size=4),
        "do_resize": st.booleans(),
    }))


@settings(FAST, max_examples=40)
@given(cfg=PREPROCESSOR)
def test_a_bad_preprocessor_config_is_one_line(tmp_path_factory, cfg):
    from adatoken_compile.models.checkpoint import image_processing

    d = tmp_path_factory.mktemp("pre")
    (d / "preprocessor_config.json").write_text(json.dumps(cfg))
    try:
        proc = image_processing(str(d), 56)
    except InputError as e:
        one_line(e)
        return
    out = proc(np.zeros((30, 40, 3), np.uint8))  # what it accepts, it applies
    assert out.shape == (3, 56, 56) and np.isfinite(out).all()


@settings(FAST, max_examples=20)
@given(questions=st.one_of(st.integers(), st.floats(), st.none().map(lambda _: object()), st.binary(max_size=4),
                           st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2)))
def test_the_runtime_api_refuses_wrong_argument_types_with_input_error(questions):
    from adatoken_compile.runtime.engine import Runtime

    rt = Runtime.__new__(Runtime)  # _pairs reads nothing of the loaded artifact
    with pytest.raises(InputError, match="questions") as e:
        rt._pairs(simple_scene(V=1, H=8, W=8), questions)
    one_line(e.value)


def _disk_full_errors():
    from safetensors import SafetensorError

    return [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
            SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                            'left on device" })'),
            RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos; PytorchStreamWriter failed "
                         "writing file data/0: file write failed (No space left on device)"),
            OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))]


@settings(FAST, max_examples=20)
@given(which=st.integers(0, 3), kind=st.sampled_from(["checkpoint", "calibration"]), earlier=st.booleans(),
       as_file=st.booleans())
def test_a_full_disk_is_one_line_whichever_library_was_writing(tmp_path_factory, which, kind, earlier, as_file):
    """make-tiny writes with safetensors and torch, calibrate with numpy and json: each wraps ENOSPC
    its own way, and each is the same one line, with the earlier output kept and no temporary left."""
    d = tmp_path_factory.mktemp("full")
    out = str(d / ("p.json" if as_file else "o"))
    if earlier and not as_file:
        _own_dir(out, kind)
    before = _snapshot(d)
    err = _disk_full_errors()[which]
    with pytest.raises(InputError, match="free some space|could not write") as e:
        if as_file:
            with aio.atomic_file(out, "predictions") as tmp:
                open(tmp, "w").write("partial")
                raise err
        else:
            with aio.atomic_dir(out, kind, overwrite=True) as tmp:
                open(os.path.join(tmp, "partial"), "w").write("x")
                raise err
    one_line(e.value)
    assert _snapshot(d) == before and leftovers(d) == []
    with pytest.raises(ValueError, match="a bug"):  # what is not a write failure stays what it is
        with aio.atomic_dir(str(d / "other"), kind) as tmp:
            raise ValueError("a bug")


@settings(FAST, max_examples=25)
@given(short=st.integers(1, 3), long=st.integers(20, 400), tall=st.booleans())
def test_a_scene_of_slivers_is_refused_before_any_view_is_resized(short, long, tall):
    from PIL import Image

    from adatoken_compile.runtime.scene import preprocess_scene

    H, W = (long, short) if tall else (short, long)
    scene = simple_scene(V=2, H=H, W=W)
    proc = ImageProcessing.clip(28)
    nh, nw = proc.resized_hw(H, W)
    mp = pytest.MonkeyPatch()
    mp.setenv(LIMIT_ENV["view_pixels"], "20000")
    resized = []
    real = Image.Image.resize
    mp.setattr(Image.Image, "resize", lambda self, *a, **k: resized.append(self.size) or real(self, *a, **k))
    try:
        if nh * nw > 20000:
            with pytest.raises(InputError, match="resizes to") as e:
                preprocess_scene(scene, 28, processing=proc)
            one_line(e.value)
            assert resized == []
        else:
            assert preprocess_scene(scene, 28, processing=proc).pixel_values.shape == (2, 3, 28, 28)
    finally:
        mp.undo()


@settings(FAST, max_examples=30)
@given(prefix=PREFIX, parts=st.lists(st.sampled_from(["..", ".", "frames", "outside"]), min_size=0, max_size=3),
       which=st.sampled_from(["img_path", "depth_path"]))
def test_info_file_frames_are_read_only_beside_the_info_file(tmp_path_factory, prefix, parts, which):
    """An EmbodiedScan info file names its frames relative to its own folder: an absolute path or a
    '..' is one line, never a read elsewhere."""
    from adatoken_compile.runtime import embodiedscan
    from adatoken_compile.runtime.sources import open_scene

    top = tmp_path_factory.mktemp("es")
    d = top / "data"
    embodiedscan.write([("scene0", simple_scene(V=1, H=8, W=8))], str(d))
    info_path = d / "embodiedscan_infos.json"
    info = json.load(open(info_path))
    entry = next(iter(info.values()))
    frame = entry["images"][0] if "images" in entry else next(v for v in entry.values() if isinstance(v, dict))
    key = which if "images" in entry else ("depth" if which == "depth_path" else None)
    if key is None:  # frames keyed by their image path: move the key
        (old, val), = [(k, v) for k, v in entry.items() if isinstance(v, dict) and "pose" in v]
        original = old
    else:
        original = frame[key]
    target = prefix + "/".join([*parts, os.path.basename(original)])
    for where in (top, top.parent):  # a copy outside the info file's folder, so a read there would succeed
        (where / os.path.basename(original)).write_bytes((d / original).read_bytes())
    if key is None:
        entry[target] = entry.pop(old)
    else:
        frame[key] = target
    info_path.write_text(json.dumps(info))
    try:
        open_scene(str(info_path), num_frames=1)
    except InputError as e:
        one_line(e)
        return
    norm = os.path.normpath(os.path.join(str(d), target))
    assert os.path.commonpath([norm, str(d)]) == str(d) and not os.path.isabs(target), target


@settings(FAST, max_examples=20)
@given(mb=st.integers(1, 3), extra=st.integers(1, 1000), reader=st.sampled_from(["questions", "info", "tokenizer"]),
       raw=st.sampled_from([None, "0", "-1", "x", "1e3", str(1 << 30)]))
def test_json_data_files_are_bounded_by_their_own_overridable_limit(tmp_path_factory, mb, extra, reader, raw):
    """Question files, info files and tokenizer.json: refused from their size over the limit (a parse of
    64 MB of "{}," takes 1.6 GB), raised by ADATOKEN_COMPILE_MAX_JSON_MB, whose bad values are one line."""
    from adatoken_compile.readers import MAX_DATA_JSON_ENV

    p = tmp_path_factory.mktemp("big") / ("q.json" if reader == "questions" else "f.json")
    p.write_text("[" + " " * ((mb << 20) + extra) + "]")
    read = _readers()[reader]
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv(MAX_DATA_JSON_ENV, raw if raw is not None else str(mb))
        with pytest.raises(InputError) as e:
            read(str(p))
        msg = one_line(e.value)
        assert ("too large" in msg) if raw is None else (MAX_DATA_JSON_ENV in msg)
    finally:
        mp.undo()


@settings(FAST, max_examples=25)
@given(value=st.one_of(st.integers(-3, 0), st.floats(), st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2)),
       call=st.sampled_from(["evaluate_limit", "load", "calibrate_out", "compile_out"]))
def test_api_arguments_of_the_wrong_type_are_input_errors(tmp_path_factory, value, call):
    from adatoken_compile import api
    from adatoken_compile.runtime import load

    if call != "evaluate_limit" and isinstance(value, str):
        value = 5  # a string is a path to these: the wrong type is anything else
    run = {"evaluate_limit": lambda: api.evaluate(limit=value), "load": lambda: load(value),
           "calibrate_out": lambda: api.calibrate(out=value), "compile_out": lambda: api.compile(out=value)}[call]
    with pytest.raises(InputError) as e:
        run()
    one_line(e.value)


@settings(FAST, max_examples=10)
@given(kind=st.sampled_from(["dev_null_link", "fifo", "fifo_link", "dir", "big"]))
def test_merged_statistics_archive_is_a_bounded_regular_file_before_it_is_hashed(tmp_path_factory, kind):
    import signal

    from adatoken_compile.calibration.stats import CalibrationStats

    d = tmp_path_factory.mktemp("stats")
    arch = {"num_layers": 2, "hidden": 8, "heads": 2, "kv_heads": 2, "head_dim": 4, "intermediate": 16, "vocab": 32}
    CalibrationStats.empty(arch, "fp").save(str(d))
    os.remove(d / "stats.npz")
    if kind == "big":
        (d / "stats.npz").write_bytes(b"\0" * (4 << 20))
    else:
        os.replace(_special(kind, d), d / "stats.npz")
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail(f"the statistics read blocked on {kind}"))
    signal.alarm(30)
    try:
        with pytest.raises(InputError) as e:
            CalibrationStats.load(str(d))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    one_line(e.value)
