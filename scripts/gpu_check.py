"""The CUDA figures, in one run on a machine with an NVIDIA GPU (docs/deploying.md, "GPU check").

    python scripts/gpu_check.py --out runs/gpu [--budget-s 780] [--layers 4]

1. names the device (nvidia-smi), the ONNX Runtime providers and torch's CUDA;
2. with onnxruntime-gpu (``CUDAExecutionProvider``): compiles the bundled model's identity and
   pruned artifacts (the default cuts L1:0.7, L2:0.4) in float32 and float16, and benches each
   pruned artifact against the identity of its precision with ``--provider cuda`` (prefill and
   16-token end-to-end latency, FLOPs ratio, realised fraction); checks a bfloat16 artifact loads
   and answers on CUDA; then a LLaVA-3D-7B-width random checkpoint (``make-tiny --preset
   llava3d-7b --layers N``: full width, depth N, so that it fits the time) compiled in float16 and
   int4, prefill pruned vs identity at 1,400 spatial + 60 text tokens on CUDA;
   then decode per token on CUDA with the KV buffers bound on the device (IO binding) against the
   same decode graph fed and fetched as numpy every step, at 1,460 and 3,000 tokens of context, on
   the 7B-width float16 identity artifact, with the KV and logits bytes each moved per step
   (ONNX Runtime GenAI on CUDA is not run here: its package and model builder need a network);
3. without it (or if a CUDA session cannot start): times the pruned PyTorch prefill against the
   unpruned one on CUDA (float16, 7B width, depth N) and records why ONNX Runtime could not run;
4. with torch's CUDA: ``calibrate --device cuda --dtype bfloat16`` of a 7B-width checkpoint (depth
   N) on few-frame scenes, layer-major and whole-model (``--engine layered`` / ``sample``), with
   wall time, time per sample-layer and the schedule found.

``--rehearse-decode-on-cpu ART`` runs only the decode comparison, on the CPU, on a compiled
artifact, and ``--rehearse-calibrate-on-cpu MODEL`` only the calibration step, on the CPU in
float32 on a small checkpoint (each checks its step without a GPU).

Every step is skipped once ``--budget-s`` is spent; results.json records what ran, with timings.
Nothing here is needed on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CUTS = [(1, 0.7), (2, 0.4)]  # the bundled model's calibrated default schedule


def sh(cmd: list[str], log) -> str:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log(f"$ {' '.join(cmd)}  ({time.perf_counter() - t0:.0f} s, rc {r.returncode})")
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-1500:]}")
    return r.stdout


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "adatoken_compile", *map(str, args)]


def device_info() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError as e:
        info["nvidia_smi"] = f"unavailable ({e})"
    import onnxruntime as ort

    info["onnxruntime"] = ort.__version__
    info["ort_providers"] = ort.get_available_providers()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError as e:
        info["torch"] = f"unavailable ({e})"
    return info


def ort_cuda_works() -> tuple[bool, str]:
    """Whether a CUDA session starts and runs (a provider listed is not enough: libraries may be missing)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu in place of onnxruntime)"
    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    try:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
        s.run(None, {"x": np.ones(2, np.float32)})
        if s.get_providers()[0] != "CUDAExecutionProvider":
            return False, f"a CUDA session fell back to {s.get_providers()}"
    except Exception as e:  # the reason is the finding
        return False, f"{type(e).__name__}: {str(e)[:500]}"
    return True, "ok"


def torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def schedule_file(path: str, layers: int, fingerprint: str | None = None) -> str:
    from adatoken_compile.schedule import Cut, Schedule

    Schedule([Cut(l, k) for l, k in CUTS], layers, fingerprint=fingerprint, policy="adaptive-default").save(path)
    return path


def bundled_on_cuda(out: str, log, res: dict, budget) -> None:
    from adatoken_compile.runtime import load

    arts = {}
    for dtype in ("float32", "float16"):
        for kind in ("identity", "pruned"):
            budget()
            path = os.path.join(out, f"bundled-{dtype}-{kind}")
            args = ["compile", "--dtype", dtype, "--out", path, "--overwrite"]
            if kind == "pruned":
                fp = load(arts[(dtype, "identity")], "cpu", check_hashes=False).manifest.fingerprint
                args += ["--schedule", schedule_file(os.path.join(out, "bundled-schedule.json"), 8, fp)]
            sh(cli(*args), log)
            arts[(dtype, kind)] = path
        budget()
        js = sh(cli("bench", "--artifact", arts[(dtype, "pruned")], "--baseline", arts[(dtype, "identity")],
                    "--provider", "cuda", "--repeats", 7, "--json"), log)
        res[f"bundled_{dtype}"] = json.loads(js[js.index("{"):])
        p = res[f"bundled_{dtype}"]["prefill"]
        log(f"bundled {dtype}: prefill ratio {p['latency_ratio']:.3f}, FLOPs ratio {p['flops_ratio']:.3f}, "
            f"realized {p['realized_fraction']:.2f}, provider {res[f'bundled_{dtype}']['provider']}")
    budget()
    path = os.path.join(out, "bundled-bfloat16-identity")
    sh(cli("compile", "--dtype", "bfloat16", "--out", path, "--overwrite"), log)
    res["bundled_bfloat16_answer"] = sh(cli("run", "--artifact", path, "--provider", "cuda"), log).strip()
    for dtype in ("float16", "bfloat16"):
        budget()
        ref = arts[("float32", "identity")]
        cand = arts[("float16", "identity")] if dtype == "float16" else path
        js = sh([sys.executable, os.path.join(ROOT, "scripts", "precision_report.py"), "--reference", ref,
                 "--candidate", f"{dtype}={cand}", "--limit", "60", "--out", os.path.join(out, f"parity-{dtype}.json")],
                log)
        del js
        with open(os.path.join(out, f"parity-{dtype}.json")) as f:
            res[f"bundled_{dtype}_parity_cpu_vs_cuda"] = json.load(f)["results"][dtype]


DECODE_CONTEXTS = [(1400, 60), (2940, 60)]


def decode_on_device(art: str, log, res: dict, budget, provider: str = "cuda", contexts=DECODE_CONTEXTS,
                     steps: int = 16, rounds: int = 3, key: str | None = None) -> dict:
    """Decode per token of one artifact with its KV buffers bound on the session's device vs the
    same graph fed and fetched as numpy every step, interleaved rounds."""
    from adatoken_compile.benchmarking.decode import bench_decode

    budget()
    r = bench_decode({"bound": (art, "a", True), "numpy": (art, "a", False)}, list(contexts), steps=steps,
                     rounds=rounds, providers=provider, log=log)
    for c, v in r["contexts"].items():
        log(f"decode on {provider} at {c} tokens: bound {v['bound']['ms_per_token']:.2f} ms "
            f"({v['bound']['kv_bytes_per_step']:.0f} KV B/step), numpy {v['numpy']['ms_per_token']:.2f} ms "
            f"({v['numpy']['kv_bytes_per_step'] / 1e6:.1f} MB KV/step), ratio "
            f"{v['bound']['ms_per_token'] / v['numpy']['ms_per_token']:.3f}")
    res[key or f"decode_{provider}"] = r
    return r


def seven_b_width_on_cuda(out: str, log, res: dict, budget, layers: int) -> None:
    ckpt = os.path.join(out, f"llava3d-7b-L{layers}")
    budget()
    sh(cli("make-tiny", "--preset", "llava3d-7b", "--layers", layers, "--out", ckpt, "--overwrite"), log)
    for tag, extra in (("float16", ["--dtype", "float16"]), ("int4", ["--quantize", "int4"])):
        paths = {}
        for kind in ("identity", "pruned"):
            budget()
            paths[kind] = os.path.join(out, f"7b-{tag}-{kind}")
            if kind == "pruned":  # a schedule names its model: the fingerprint the identity compile recorded
                with open(os.path.join(paths["identity"], "manifest.json")) as f:
                    fp = json.load(f)["model"]["fingerprint"]
                sched = schedule_file(os.path.join(out, f"7b-schedule-L{layers}.json"), layers, fp)
            # the float16 identity keeps its decode graph: the decode-on-device step runs on it
            keep_decode = tag == "float16" and kind == "identity"
            sh(cli("compile", "--model", ckpt, *extra, *([] if keep_decode else ["--no-decode"]), "--out", paths[kind],
                   "--overwrite", *(["--schedule", sched] if kind == "pruned" else [])), log)
        budget()
        js = sh(cli("bench", "--artifact", paths["pruned"], "--baseline", paths["identity"], "--tokens", "1400,60",
                    "--provider", "cuda", "--repeats", 5, "--json"), log)
        res[f"7b_width_L{layers}_{tag}"] = json.loads(js[js.index("{"):])
        p = res[f"7b_width_L{layers}_{tag}"]["prefill"]
        log(f"7B width, {layers} layers, {tag}: prefill {p['latency_s']['pruned']['median_s'] * 1e3:.1f} ms vs "
            f"{p['latency_s']['baseline']['median_s'] * 1e3:.1f} ms, ratio {p['latency_ratio']:.3f}, "
            f"FLOPs ratio {p['flops_ratio']:.3f}, realized {p['realized_fraction']:.2f}")
        if tag == "float16":
            try:
                decode_on_device(paths["identity"], log, res, budget, key=f"7b_width_L{layers}_float16_decode_cuda")
            except Exception as e:  # the prefill figures stand without it
                res["errors"].append({"step": "decode_cuda", "error": f"{type(e).__name__}: {e}",
                                      "trace": traceback.format_exc()})
                log(f"decode on cuda: failed ({type(e).__name__}: {str(e)[:300]})")
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)


def calibrate_on_device(out: str, log, res: dict, budget, layers: int, device: str = "cuda",
                        dtype: str = "bfloat16", ckpt: str | None = None, samples: int = 8, holdout: int = 16) -> None:
    """``calibrate`` of a LLaVA-3D-7B-width random checkpoint (depth ``layers``) on ``device`` in
    ``dtype``, layer-major (``--engine layered``) and whole-model (``--engine sample``), on the same
    few-frame scenes and questions as ``scripts/deploy_7b.sh``: wall time, the engine's time per
    sample-layer, the schedule found (``ckpt``: another checkpoint, to rehearse the step)."""
    if ckpt is None:
        ckpt = os.path.join(out, f"llava3d-7b-L{layers}-cal")
        budget()
        sh(cli("make-tiny", "--preset", "llava3d-7b", "--layers", layers, "--out", ckpt, "--overwrite"), log)
        with open(os.path.join(ckpt, "config.json")) as f:
            cfg = json.load(f)
        cfg["num_frames"] = 1  # a prefill of a few hundred tokens: the step measures the engines, not long scenes
        with open(os.path.join(ckpt, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    scenes, questions = os.path.join(out, "cal-scenes"), os.path.join(out, "cal-questions.json")
    sh(cli("make-scene", "--count", 6, "--format", "scannet", "--out", scenes, "--questions", questions, "--overwrite"), log)
    for engine in ("layered", "sample"):
        budget()
        dst = os.path.join(out, f"cal-{device.replace(':', '')}-{dtype}-{engine}")
        t0 = time.perf_counter()
        sh(cli("calibrate", "--model", ckpt, "--device", device, "--dtype", dtype, "--engine", engine, "--data", questions,
               "--scenes", scenes, "--samples", samples, "--holdout", holdout, "--flops-budget", 0.5,
               "--max-validations", 1, "--out", dst, "--overwrite"), log)
        wall = time.perf_counter() - t0
        with open(os.path.join(dst, "schedule.json")) as f:
            sch = json.load(f)
        cal = sch["calibration"]
        res[f"calibrate_{device}_{dtype}_{engine}"] = {
            "wall_s": wall, "cuts": [[c["layer"], c["keep"]] for c in sch.get("cuts", [])],
            "engine": cal.get("engine"), "precision": cal.get("precision"), "samples": samples, "holdout": holdout}
        e = cal.get("engine") or {}
        log(f"calibrate on {device} {dtype}, {engine}: {wall:.0f} s, per sample-layer "
            + ", ".join(f"{k} {e.get(k + '_s_per_sample_layer', 0):.3f} s" for k in ("statistics", "references", "validation"))
            + f"; cuts {res[f'calibrate_{device}_{dtype}_{engine}']['cuts']}")


def torch_on_cuda(log, res: dict, budget, layers: int, device: str = "cuda", hidden: int = 4096) -> None:
    """Fallback: the pruned PyTorch prefill (the reference the artifacts are parity-tested against)
    against the unpruned one, float16, 7B width, on CUDA (``device``/``hidden`` only to rehearse
    the step on a CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adatoken_compile.benchmarking.synthetic import synthetic_inputs
    from adatoken_compile.compiler.reference import pruned_prefill
    from adatoken_compile.contract import DecoderInputs
    from adatoken_compile.flops import prefill_flops
    from adatoken_compile.arch import from_config
    from adatoken_compile.schedule import Cut, Schedule, identity

    budget()
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008 * hidden // 4096, vocab_size=32000, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dt = torch.float16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dt).eval()
    inputs = synthetic_inputs(hidden, [(35, 1400, 25)], seed=1)
    inputs = DecoderInputs(inputs.inputs_embeds.to(device, dt), inputs.attention_mask.to(device),
                           inputs.position_ids.to(device), inputs.spatial_mask.to(device), inputs.spans)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sched = Schedule([Cut(l, k) for l, k in CUTS], layers)
    scheds = {"pruned": sched, "baseline": identity(layers)}
    times = {k: [] for k in scheds}
    with torch.no_grad():
        for name, s in scheds.items():  # warm-up
            pruned_prefill(model, inputs, s)
        for _ in range(10 if device == "cuda" else 2):
            for name, s in scheds.items():
                sync()
                t0 = time.perf_counter()
                pruned_prefill(model, inputs, s)
                sync()
                times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    arch = from_config(cfg)
    fr = prefill_flops(arch, 60, sched.tokens_per_layer(1400))["total"] / prefill_flops(arch, 60, [1400] * layers)["total"]
    lr = med["pruned"] / med["baseline"]
    res[f"torch_{device}_h{hidden}_L{layers}_{str(dt)[6:]}"] = {"median_s": med, "latency_ratio": lr, "flops_ratio": fr,
                                                                 "realized_fraction": (1 - lr) / (1 - fr), "runs": times}
    log(f"PyTorch {device} {str(dt)[6:]}, hidden {hidden}, {layers} layers: ratio {lr:.3f}, FLOPs ratio {fr:.3f}, "
        f"realized {(1 - lr) / (1 - fr):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=780.0, help="skip the steps left once this is spent")
    ap.add_argument("--layers", type=int, default=4, help="depth of the 7B-width checkpoint")
    ap.add_argument("--rehearse-torch-on-cpu", action="store_true",
                    help="run only the PyTorch fallback step, on the CPU at a small width (checks the script)")
    ap.add_argument("--rehearse-calibrate-on-cpu", metavar="MODEL", default=None,
                    help="run only the calibration step, on the CPU in float32, on this checkpoint (checks the script)")
    ap.add_argument("--rehearse-decode-on-cpu", metavar="ART", default=None,
                    help="run only the decode bound-vs-numpy step, on the CPU, on this artifact (checks the script)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    res: dict = {"steps": [], "errors": []}

    def log(msg: str) -> None:
        line = f"[gpu_check {time.perf_counter() - t_start:5.0f}s] {msg}"
        print(line, flush=True)
        res["steps"].append(line)

    class OutOfTime(Exception):
        pass

    def budget() -> None:
        if time.perf_counter() - t_start > args.budget_s:
            raise OutOfTime()

    def save() -> None:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(res, f, indent=2, default=str)

    if args.rehearse_decode_on_cpu:
        decode_on_device(args.rehearse_decode_on_cpu, log, res, budget, provider="cpu", contexts=[(40, 20), (80, 20)],
                         steps=4, rounds=2)
        save()
        return
    if args.rehearse_calibrate_on_cpu:
        calibrate_on_device(args.out, log, res, budget, 0, device="cpu", dtype="float32",
                            ckpt=args.rehearse_calibrate_on_cpu, samples=2, holdout=2)
        save()
        return
    if args.rehearse_torch_on_cpu:
        torch_on_cuda(log, res, budget, 3, device="cpu", hidden=256)
        save()
        return
    res["device"] = device_info()
    log(f"device: {res['device']}")
    ok, why = ort_cuda_works()
    res["ort_cuda"] = {"works": ok, "why": why}
    log(f"ONNX Runtime CUDA: {why}")
    steps = ([("bundled", lambda: bundled_on_cuda(args.out, log, res, budget)),
              ("7b_width", lambda: seven_b_width_on_cuda(args.out, log, res, budget, args.layers))] if ok else
             [("torch_cuda", lambda: torch_on_cuda(log, res, budget, args.layers))])
    if torch_cuda():  # calibration is PyTorch's: it runs on the GPU whether or not onnxruntime-gpu is there
        steps.append(("calibrate_cuda", lambda: calibrate_on_device(args.out, log, res, budget, args.layers)))
    for name, step in steps:
        try:
            step()
        except OutOfTime:
            log(f"{name}: skipped, the budget of {args.budget_s:.0f} s is spent")
        except Exception as e:  # record and go on: every figure that can be measured is
            res["errors"].append({"step": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
            log(f"{name}: failed ({type(e).__name__}: {str(e)[:300]})")
        save()
    res["wall_s"] = time.perf_counter() - t_start
    save()
    log(f"done in {res['wall_s']:.0f} s -> {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
