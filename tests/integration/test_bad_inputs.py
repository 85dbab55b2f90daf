"""The CLI (in-process, click's CliRunner) and real subprocesses, fed generated bad inputs of every
class: checkpoints, artifacts, scenes, questions, output paths, interrupts. Every case ends in one
`error: ` line with exit 2, or in a real answer; never a traceback, never NaN tokens or logits,
never a user's file touched, never a temporary path left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from adatoken_compile import api, io as aio
from adatoken_compile.cli import main
from adatoken_compile.errors import InputError
from adatoken_compile.runtime import load

from conftest import simple_scene

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# fixed examples in CI (derandomize) and no example database written into the checkout
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
VALUES = st.sampled_from([None, True, False, 0, -1, 1.7, 1e308, "", "x", "64", [], [1, 2], {}, {"a": 1}, 10**12])


def cli(*args):
    """Exit code and output of one command; a failure must be exactly one `error: ` line, exit 2."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), f"traceback: {r.exception!r}"
    assert "Traceback" not in r.output
    if r.exit_code != 0:
        lines = [line for line in r.output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert r.exit_code == 2 and len(errors) == 1 and lines[-1] == errors[0], r.output
    return r.exit_code, r.output


def no_temps(*dirs):
    for d in dirs:
        left = [n for n in os.listdir(d) if ".tmp-" in n]
        assert not left, left


def tree_digest(path) -> str:
    h = hashlib.sha256()
    for dp, dn, fn in sorted(os.walk(path)):
        dn.sort()
        for f in sorted(fn):
            p = os.path.join(dp, f)
            h.update(p.encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def art(tiny_artifact):
    return tiny_artifact[0]


@pytest.fixture(scope="module")
def rt(art):
    return load(art)


@pytest.fixture(scope="module")
def adapter(tiny3d_dir):
    return api.load_model(tiny3d_dir)


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FIELDS = [("config.json", k) for k in (
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "vocab_size", "max_position_embeddings", "eos_token_id", "rms_norm_eps", "hidden_act", "model_type", "architectures",
    "mm_hidden_size", "mm_vision_tower", "mm_vision_select_layer", "mm_vision_select_feature", "mm_projector_type")] + [
    ("vision_tower/config.json", k) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")] + [
    ("vision_tower/preprocessor_config.json", k) for k in ("crop_size", "image_mean", "image_std")] + [
    ("tokenizer_config.json", k) for k in ("bos_token", "eos_token")]


@settings(max_examples=12, **FUZZ)
@given(field=st.sampled_from(CHECKPOINT_FIELDS), value=VALUES | st.sampled_from([[0, 0, 0], -1e-5, 0.0, 99]))
def test_checkpoint_fields_answer_or_one_line_error(tiny3d_dir, scene_file, tmp_path_factory, field, value):
    code, out = _run_with_field(tiny3d_dir, str(tmp_path_factory.mktemp("ckpt") / "m"), field, value, scene_file)
    assert code == 2 or "answer:" in out


def _run_with_field(tiny3d_dir, d, field, value, scene_file):
    """`run` on a copy of the tiny checkpoint at ``d`` whose JSON file ``field[0]`` holds ``value`` at ``field[1]``."""
    shutil.copytree(tiny3d_dir, d)
    path = os.path.join(d, field[0])
    cfg = json.load(open(path))
    cfg[field[1]] = value
    json.dump(cfg, open(path, "w"))
    return cli("run", "--model", d, "--scene", scene_file, "-q", "what is here?", "--max-new-tokens", "2")


@pytest.mark.parametrize("field, value, msg", [
    (("config.json", "mm_vision_select_feature"), "cls_patch", "no 3D position"),
    (("config.json", "num_frames"), -5, "num_frames must be a whole number in"),
    (("config.json", "num_frames"), 10**6, "num_frames must be a whole number in"),
    (("config.json", "num_frames"), 1.5, "num_frames must be a whole number in"),
    (("vision_tower/preprocessor_config.json", "resample"), 99, "not a Pillow filter"),
    (("vision_tower/preprocessor_config.json", "resample"), "", "malformed"),
])
def test_documented_config_faults_are_one_line_before_any_scene(tiny3d_dir, scene_file, tmp_path, field, value, msg):
    code, out = _run_with_field(tiny3d_dir, str(tmp_path / "m"), field, value, scene_file)
    assert code == 2 and msg in out, out


@pytest.mark.parametrize("rel, raw, msg", [
    ("config.json", b"\xff{", "not UTF-8"), ("config.json", b"[]", "must be an object"),
    ("vision_tower/preprocessor_config.json", b"[1, 2]", "must be an object"),
    ("config.json", "DIR", "is a directory"), ("model.safetensors.index.json", b'{"weight_map": [1]}', "weight_map"),
    ("tokenizer.json", b"{}", "unreadable tokenizer"), ("model.safetensors", b"junk", "unreadable safetensors")])
def test_malformed_checkpoint_files(tiny3d_dir, tmp_path, rel, raw, msg):
    d = str(tmp_path / "m")
    shutil.copytree(tiny3d_dir, d)
    p = os.path.join(d, rel)
    if raw == "DIR":
        os.remove(p)
        os.makedirs(p)
    else:
        open(p, "wb").write(raw)
    code, out = cli("inspect", "--model", d)
    assert code == 2 and msg in out


def test_non_finite_weights_and_unbuildable_configs_refused_at_load(tiny3d_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = str(tmp_path / "nan")
    shutil.copytree(tiny3d_dir, d)
    sd = load_file(os.path.join(d, "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, os.path.join(d, "model.safetensors"))
    code, out = cli("inspect", "--model", d)
    assert code == 2 and "'model.layers.0.mlp.up_proj.weight' holds NaN or inf" in out
    d2 = str(tmp_path / "huge")
    shutil.copytree(tiny3d_dir, d2)
    cfg = json.load(open(os.path.join(d2, "config.json")))
    cfg.update(hidden_size=65536, intermediate_size=262144)  # 100+ GB of weights implied: refused before it is built
    json.dump(cfg, open(os.path.join(d2, "config.json"), "w"))
    code, out = cli("inspect", "--model", d2)
    assert code == 2 and "the config does not describe these weights" in out
    cfg = json.load(open(os.path.join(tiny3d_dir, "config.json")))
    for key, value in (("hidden_act", "nope"), ("rope_parameters", {"rope_type": "nope"})):
        json.dump({**cfg, key: value}, open(os.path.join(d2, "config.json"), "w"))
        code, out = cli("inspect", "--model", d2)
        assert code == 2 and "LlamaForCausalLM cannot be built from this config" in out, out


# ----------------------------------------------------------------------------- artifacts


def _rehashed_copy(art, dst, edit_manifest=None, edit_file=None):
    shutil.copytree(art, dst)
    if edit_file:
        rel, fn = edit_file
        p = os.path.join(dst, rel)
        d = json.load(open(p))
        fn(d)
        json.dump(d, open(p, "w"))
    m = json.load(open(os.path.join(dst, "manifest.json")))
    for rel in m["files"]:  # a forger re-hashes every file: only the digest tells
        p = os.path.join(dst, rel)
        m["files"][rel] = {"sha256": hashlib.sha256(open(p, "rb").read()).hexdigest(), "size": os.path.getsize(p)}
    if edit_manifest:
        edit_manifest(m)
    json.dump(m, open(os.path.join(dst, "manifest.json"), "w"))
    return dst


def _set(path, value):
    def edit(d):
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


ARTIFACT_FIELDS = [("manifest.json", p) for p in (
    ("schedule", "cuts", 0, "layer"), ("schedule", "cuts", 0, "keep"), ("schedule", "model", "num_layers"),
    ("model", "fingerprint"), ("model", "family"), ("graphs", "decode", "file"), ("graphs", "encoder"),
    ("files", "embed_tokens.npy", "size"), ("tokenizer",), ("version",), ("created_at",))] + [
    ("preprocess.json", p) for p in (("image_size",), ("patch_size",), ("std",), ("mean",), ("voxel_size",),
                                     ("max_tokens",), ("eos_id",), ("max_positions",), ("prompt", "format"),
                                     ("arch", "hidden"), ("input",), ("positions",), ("positions", "layout"))]


@settings(max_examples=12, **FUZZ)
@given(field=st.sampled_from(ARTIFACT_FIELDS), value=VALUES | st.sampled_from([[0, 0, 0], 0.5, 4, 2, "image"]))
def test_artifact_fields_answer_or_one_line_error(art, scene_file, tmp_path_factory, field, value):
    rel, path = field
    dst = str(tmp_path_factory.mktemp("art") / "a")
    if rel == "manifest.json":
        _rehashed_copy(art, dst, edit_manifest=_set(path, value))
    else:
        _rehashed_copy(art, dst, edit_file=(rel, _set(path, value)))
    code, out = cli("run", "--artifact", dst, "--scene", scene_file, "-q", "what is here?", "--max-new-tokens", "2")
    assert code == 2 or "answer:" in out
    digest = load(art).manifest.digest  # the compiled artifact's digest refuses any rewritten manifest
    code, out = cli("run", "--artifact", dst, "--digest", digest, "--scene", scene_file, "-q", "what?")
    assert code == 2


def test_position_layout_absent_is_sequence_and_mismatched_is_one_line(art, scene_file, tmp_path):
    """An artifact compiled before the layout was declared answers as the declared one does; a
    layout whose rank is not the graphs' is refused at load, one line."""
    args = ("--scene", scene_file, "-q", "what is here?", "--max-new-tokens", "3")
    def answer(path):
        code, out = cli("run", "--artifact", path, *args)
        assert code == 0
        return [line for line in out.splitlines() if line.startswith("answer:")]

    old = _rehashed_copy(art, str(tmp_path / "old"), edit_file=("preprocess.json", lambda d: d.pop("positions")))
    assert load(old).positions.name == "sequence"
    assert answer(old) == answer(art) and answer(art)
    bad = _rehashed_copy(art, str(tmp_path / "bad"), edit_file=("preprocess.json", _set(("positions", "layout"), "grid3")))
    code, out = cli("run", "--artifact", bad, *args)
    assert code == 2 and "takes 2-D position_ids, but the artifact declares the 'grid3' layout (3-D)" in out


def test_digest_accepts_the_compiled_artifact_and_only_it(art, scene_file, tmp_path):
    from adatoken_compile.artifact import file_digest

    digest = file_digest(os.path.join(art, "manifest.json"))
    assert load(art, expected_digest=digest).manifest.digest == digest
    assert cli("run", "--artifact", art, "--digest", digest, "--scene", scene_file, "-q", "what?")[0] == 0
    dst = _rehashed_copy(art, str(tmp_path / "forged"), edit_manifest=_set(("created_at",), "2000-01-01"))
    assert load(dst).manifest.digest != digest  # hashes all match: without the digest it loads
    with pytest.raises(InputError, match="differs from the expected"):
        load(dst, expected_digest=digest)
    for bad in ("abc", "sha256:xyz", digest.upper()):
        with pytest.raises(InputError, match="not an artifact digest"):
            load(art, expected_digest=bad)


def test_runtime_opens_only_listed_files(art, scene_file, tmp_path):
    dst = _rehashed_copy(art, str(tmp_path / "a"), edit_manifest=lambda m: m["files"].pop("tokenizer/tokenizer_config.json"))
    cfg = os.path.join(dst, "tokenizer", "tokenizer_config.json")
    os.remove(cfg)
    os.symlink("/etc/passwd", cfg)  # unlisted, so never opened
    rt = load(dst)
    assert rt.tokenizer.eos_id == load(art).tokenizer.eos_id  # the defaults name the same tokens
    assert cli("run", "--artifact", dst, "--scene", scene_file, "-q", "what?")[0] == 0


# ----------------------------------------------------------------------------- scenes

BAD = [0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf")]
SCENE_VALUES = {"fx": [30.0, 60.0, 500.0], "cx": [0.0, 16.0, 100.0], "t": [0.0, 1.0, -3.0], "depth": [0.5, 1.0, 3.0],
                "std": [0.27]}


@settings(max_examples=25, **FUZZ)
@given(good=st.fixed_dictionaries({k: st.sampled_from(v) for k, v in SCENE_VALUES.items()}),
       broken=st.sampled_from([None, *SCENE_VALUES]), bad=st.sampled_from(BAD), views=st.integers(1, 3))
def test_scene_values_answer_with_finite_tokens_or_one_line_error(rt, good, broken, bad, views):
    v = {**good, **({broken: bad} if broken else {})}
    s = simple_scene(V=views, H=24, W=32)
    K, P = s.intrinsics.copy(), s.poses.copy()
    K[0, 0, 0], K[0, 0, 2], P[-1, 1, 3] = v["fx"], v["cx"], v["t"]
    with np.errstate(all="ignore"):
        dep = (s.depths * np.float32(v["depth"])).astype(np.float32)
    scene = {"images": s.images, "depths": dep, "poses": P, "intrinsics": K}
    pre = rt.pre
    rt.pre = {**pre, "std": [v["std"]] * 3}
    try:
        tokens = rt.encode(scene)
        answer = rt.generate(scene, "what is here?", max_new_tokens=2)
    except InputError as e:
        assert "\n" not in str(e) and broken, (v, e)  # only a broken value is refused
        return
    finally:
        rt.pre = pre
    assert np.isfinite(tokens).all() and tokens.shape[0] >= 1 and isinstance(answer, str)


def test_scene_files_of_each_bad_kind(art, tmp_path):
    s = simple_scene(V=2, H=24, W=32)
    ok = {"images": s.images, "depths": s.depths, "poses": s.poses, "intrinsics": s.intrinsics}
    cases = {"zero_fx": {"intrinsics": s.intrinsics * np.array([0, 1, 1, 1])[None, :, None]},
             "far_pose": {"poses": s.poses + np.pad(np.full((2, 3, 1), 1e30), ((0, 0), (0, 1), (3, 0)))},
             "nan_depth": {"depths": np.where(s.depths > 2, np.nan, s.depths).astype(np.float32)},
             "pickled": {"images": np.array([{}], dtype=object)}}
    for name, over in cases.items():
        p = str(tmp_path / f"{name}.npz")
        np.savez(p, **{**ok, **over})  # numpy pickles the object array
        code, out = cli("run", "--artifact", art, "--scene", p, "-q", "what?")
        assert code == 2 and p in out, (name, out)
    code, out = cli("run", "--artifact", art, "--scene", str(tmp_path), "-q", "what?")
    assert code == 2 and "a folder without color/" in out  # a folder is read as a scan, and this is none


# ----------------------------------------------------------------------------- questions: both paths alike


@settings(max_examples=20, **FUZZ)
@given(q=st.text(min_size=0, max_size=30) | st.sampled_from(["", "  \n", "what \udcff?", "a\x00", "x <image>",
                                                              "where is <boxes>?", "what " * 6000]),
       new=st.sampled_from([1, 2, 5000, 0, -1]))
def test_questions_same_decision_on_pytorch_and_artifact(rt, adapter, scene_file, q, new):
    outcomes = []
    for run in (lambda: rt.generate(scene_file, q, max_new_tokens=new),
                lambda: api.generate(adapter, scene_file, q, max_new_tokens=new)):
        try:
            outcomes.append(("answer", type(run())))
        except InputError as e:
            assert "\n" not in str(e)
            outcomes.append(("error",))
    assert outcomes[0] == outcomes[1], (q, new, outcomes)


def test_non_utf8_question_from_the_command_line(art, scene_file):
    r = subprocess.run([sys.executable, "-m", "adatoken_compile", "run", "--artifact", art, "--scene", scene_file,
                        "-q", b"what \xff is here?"], capture_output=True, cwd=ROOT, env=_env(), timeout=120)
    err = r.stderr.decode("utf-8", "replace").strip().splitlines()
    assert r.returncode == 2 and err == [err[-1]] and "question: not valid text" in err[-1], r.stderr


# ----------------------------------------------------------------------------- output paths


@pytest.fixture()
def no_work(monkeypatch):
    """Any model load, render or checkpoint write means the command started its work: refusals come first."""
    import adatoken_compile.cli.models as models
    import adatoken_compile.models.testing as testing

    def boom(*a, **k):
        raise AssertionError("the command started its work before refusing the output path")

    for mod, name in ((api, "load_model"), (models, "render"), (testing, "random_llava3d")):
        monkeypatch.setattr(mod, name, boom)


def _own(path, kind):
    """A genuine earlier output of ``kind``: its record lists every file it holds."""
    with aio.atomic_dir(path, kind) as tmp:
        open(os.path.join(tmp, "w.bin"), "wb").write(b"x")
        if kind == "artifact":
            json.dump({"format": "adatoken-compile/artifact", "files": aio.file_record(tmp)},
                      open(os.path.join(tmp, "manifest.json"), "w"))


COMMANDS = {"compile": ["compile", "--out"], "calibrate": ["calibrate", "--samples", "8", "--policy", "pdrop", "--out"],
            "make-tiny": ["make-tiny", "--out"], "make-scene": ["make-scene", "--out"],
            "eval": ["eval", "--limit", "1", "--predictions"], "quickstart": ["quickstart", "--out"]}


STATES = ["user_dir", "user_file", "parent_is_file", "other_kind", "earlier_no_overwrite"]


@pytest.mark.parametrize("command, state", [(c, s) for c in sorted(COMMANDS) for s in STATES
                                            # file outputs' earlier output: test_file_outputs_overwrite_only_their_own
                                            if not (s == "earlier_no_overwrite" and c in ("make-scene", "eval"))])
def test_outputs_refused_before_any_work_and_nothing_touched(tmp_path, no_work, command, state):
    target = str(tmp_path / "out")
    if state == "user_dir":
        os.makedirs(target)
        open(os.path.join(target, "notes.txt"), "w").write("mine")
    elif state in ("user_file", "parent_is_file"):
        open(target, "w").write("mine")
        target = os.path.join(target, "sub") if state == "parent_is_file" else target
    elif state == "other_kind":
        _own(target, "calibration" if command == "compile" else "artifact")
    else:
        _own(target, {"compile": "artifact", "calibrate": "calibration", "make-tiny": "checkpoint"}.get(command, command))
    before = tree_digest(tmp_path)
    code, out = cli(*COMMANDS[command], target)
    assert code == 2 and target in out
    assert tree_digest(tmp_path) == before
    no_temps(tmp_path)


def test_file_outputs_overwrite_only_their_own(tmp_path, tiny3d_dir, monkeypatch):
    scene = str(tmp_path / "s.npz")
    assert cli("make-scene", "--out", scene)[0] == 0
    first = open(scene, "rb").read()
    assert cli("make-scene", "--out", scene, "--seed", "2000001")[0] == 2  # no --overwrite
    assert open(scene, "rb").read() == first
    assert cli("make-scene", "--out", scene, "--seed", "2000001", "--overwrite")[0] == 0
    assert open(scene, "rb").read() != first
    preds = str(tmp_path / "p.json")
    assert cli("eval", "--model", tiny3d_dir, "--limit", "1", "--predictions", preds)[0] == 0
    assert cli("eval", "--model", tiny3d_dir, "--limit", "1", "--predictions", preds, "--overwrite")[0] == 0
    assert json.load(open(preds))[0]["prediction"] is not None
    # a full disk while writing: one line, no temporary file, the earlier scene kept
    from adatoken_compile.runtime.scene import Scene

    def full(self, path):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    second = open(scene, "rb").read()
    monkeypatch.setattr(Scene, "save", full)
    code, out = cli("make-scene", "--out", scene, "--overwrite")
    assert code == 2 and "No space left on device" in out and open(scene, "rb").read() == second
    no_temps(tmp_path)


def test_unwritable_output_folder_refused(tmp_path, no_work, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anywhere: make the check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(ro) else real(p, m, **k))
    for args in (COMMANDS["compile"], COMMANDS["make-scene"]):
        code, out = cli(*args, str(ro / "out"))
        assert code == 2 and "permission denied" in out
    ro.chmod(0o755)


def test_unexpected_errors_are_one_line_with_exit_1(monkeypatch, scene_file):
    def bug(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(api, "load_model", bug)
    r = CliRunner().invoke(main, ["run", "--scene", scene_file, "-q", "what?"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "internal error (KeyError" in r.output
    monkeypatch.setenv("ADATOKEN_COMPILE_DEBUG", "1")
    assert isinstance(CliRunner().invoke(main, ["run", "--scene", scene_file, "-q", "what?"]).exception, KeyError)


# ----------------------------------------------------------------------------- interrupts (real processes)


def _env():
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


# the calibration's write is slowed so that the signal lands while its temporary directory exists
SLOW_WRITE = ("import time, adatoken_compile.calibration.api as c; w = c.write_report; "
              "c.write_report = lambda *a, **k: (w(*a, **k), time.sleep(60)); "
              "from adatoken_compile.cli import main; main()")


def _start(cwd, argv):
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_interrupts_remove_temporary_outputs(tiny3d_dir, tmp_path):
    """SIGTERM mid-compile, SIGINT mid-calibrate: no temp path left, exit 128+n, one line; a run
    killed outright (SIGKILL) leaves its temp path, which the next command to that output removes."""
    dirs = {k: tmp_path / k for k in ("term", "int", "kill")}
    for d in dirs.values():
        d.mkdir()
    procs = {
        "term": (_start(dirs["term"], ["-m", "adatoken_compile", "compile", "--model", tiny3d_dir, "--out", "art"]),
                 signal.SIGTERM),
        "int": (_start(dirs["int"], ["-c", SLOW_WRITE, "calibrate", "--model", tiny3d_dir, "--samples", "8",
                                     "--holdout", "4", "--policy", "pdrop", "--out", "cal"]), signal.SIGINT),
        "kill": (_start(dirs["kill"], ["-m", "adatoken_compile", "compile", "--model", tiny3d_dir, "--out", "art"]),
                 signal.SIGKILL),
    }
    pending, t0 = dict(procs), time.time()
    while pending and time.time() - t0 < 240:
        for k, (p, sig) in list(pending.items()):
            assert p.poll() is None, (k, p.communicate())
            if any(".tmp-" in n for n in os.listdir(dirs[k])):
                p.send_signal(sig)
                del pending[k]
        time.sleep(0.05)
    assert not pending, "no temporary output appeared"
    for k, (p, sig) in procs.items():
        _, err = p.communicate(timeout=60)
        assert p.returncode in (128 + sig, -sig), (k, p.returncode, err)
        assert "Traceback" not in err
        if sig != signal.SIGKILL:
            assert err.strip().splitlines()[-1] == f"error: interrupted by signal {int(sig)}; temporary outputs " \
                                                   "removed, nothing written"
            assert os.listdir(dirs[k]) == [], (k, os.listdir(dirs[k]))
    assert [n for n in os.listdir(dirs["kill"]) if ".tmp-" in n]  # SIGKILL cannot be caught
    code, out = cli("compile", "--model", tiny3d_dir, "--schedule", str(tmp_path / "missing.json"), "--out",
                    str(dirs["kill"] / "art"))
    assert code == 2 and "schedule not found" in out
    assert os.listdir(dirs["kill"]) == []  # the dead run's temp path is gone


# ----------------------------------------------------------------------------- the runtime-only install

# what the base install lacks: each package of the [compile] extra made unimportable in turn
HIDE = ("import sys\nfor m in {mods}: sys.modules[m] = None\n"
        "from adatoken_compile.cli import main\nmain(sys.argv[1:])")


@pytest.mark.parametrize("command, missing", [
    (["make-tiny", "--out", "tiny"], ("torch",)),
    (["compile", "--out", "art"], ("onnx", "onnxscript", "onnx_ir")),
    (["eval", "--limit", "1"], ("transformers",)),
    (["calibrate", "--out", "cal"], ("safetensors", "torch")),
])
def test_a_missing_compile_extra_is_one_line_exit_2_not_a_bug(tmp_path, command, missing):
    r = subprocess.run([sys.executable, "-c", HIDE.format(mods=repr(missing)), *command], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "[compile] extra" in lines[0] and "internal error" not in lines[0] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_integer_weights_are_one_line_not_an_empty_answer(tiny3d_dir, scene_file, tmp_path, dtype):
    import torch
    from safetensors.torch import load_file, save_file

    d = str(tmp_path / "m")
    shutil.copytree(tiny3d_dir, d)
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    name = next(k for k in sorted(sd) if k.endswith("mlp.down_proj.weight"))
    sd[name] = sd[name].to(getattr(torch, dtype))
    save_file(sd, path, metadata={"format": "pt"})
    code, out = cli("run", "--model", d, "--scene", scene_file, "-q", "what is here?", "--max-new-tokens", "2")
    assert code == 2 and "not a floating type" in out and name in out, out


@pytest.mark.parametrize("command", [["run", "-q", "what?"], ["eval", "--limit", "1"], ["compile", "--out", "art"]])
def test_an_empty_model_is_refused_not_the_bundled_model(scene_file, tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--scene", scene_file] if command[0] == "run" else []
    code, out = cli(*command, *extra, "--model", "")
    assert code == 2 and "--model '': empty" in out and os.listdir(tmp_path) == []
