"""Side-by-side speed of this tool's artifacts and the engines a user would run instead, on one set of
weights: ONNX Runtime GenAI (its model builder) and OpenVINO GenAI (``LLMPipeline`` on an
``optimum-cli export openvino`` model).

    python scripts/bench_peers.py --out runs/peers [--contexts 500,1460,3000] [--precisions fp32,int4]
        [--rounds 3] [--new-tokens 16] [--threads 2] [--cache ~/.cache/adatoken-compile/peers]

What it builds (each step skipped when its output is already there, so a rerun only measures):
- the peers' environments: one virtual environment per peer under ``--cache``/venvs, with a local
  CPU torch and, for OpenVINO, the transformers version optimum-intel asks for;
- the fixture: a random HF LLaVA with a Llama decoder (1,024 wide, 8 layers, GQA 16/4, FFN 2,816,
  vocabulary 32,000), and its decoder alone saved as ``LlamaForCausalLM`` (the same tensors) for
  the peers;
- this tool's artifacts (``adatoken-compile compile``): unpruned and pruned (cuts L1:0.7, L2:0.4),
  float32 and ``--quantize int4``, kept per digest of this checkout's source (a code change
  rebuilds them); the peers' models: ORT GenAI ``-p fp32|int4 -e cpu``,
  OpenVINO ``--weight-format fp32|int4`` (int4: every linear layer, groups of 32 like ours).

What is compared: each engine gets the same token sequence of N positions (BOS, then seeded
random ids). The peers take the ids; this tool takes the rows of its embedding table for those
ids, with positions 16..N-17 marked spatial (what its cuts prune) and the first and last 16 as
text: unpruned, the arithmetic is the peers'. Prefill: time to the first token. Decode: mean
time per further token over ``--new-tokens`` (EOS ignored), medians over interleaved rounds
(each engine in its own worker process, loaded once, so load time is excluded). OpenVINO runs
at f32 (``INFERENCE_PRECISION_HINT=f32``) and at its default (bf16 compute where the CPU has it,
u8 KV cache); prefix caching is off. Greedy tokens of the unpruned runs are compared with this
tool's. KV bytes crossing the session boundary per decode step: the runtime's own count
(``last_transfer``) where it keeps one, else the past K/V fed in plus the present K/V returned.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "adatoken-compile", "peers")
PRECISIONS = ("fp32", "int4")
ENGINES = ("ours", "ours-pruned", "ort-genai", "openvino-f32", "openvino")
LABELS = {"ours": "this tool, unpruned", "ours-pruned": "this tool, pruned L1:0.7, L2:0.4",
          "ort-genai": "ONNX Runtime GenAI", "openvino-f32": "OpenVINO GenAI, f32",
          "openvino": "OpenVINO GenAI, default (bf16, u8 KV)"}
# engines whose greedy tokens are compared with this tool's unpruned run
UNPRUNED_PEERS = ("ort-genai", "openvino-f32", "openvino")
CUTS = ((1, 0.7), (2, 0.4))
TEXT_HEAD = TEXT_TAIL = 16  # text positions around the spatial span of this tool's prompt
INT4_BLOCK = 32  # this tool's default MatMulNBits block; the peers are asked for the same
FIXTURE = dict(decoder="llama", layers=8, hidden=1024, heads=16, kv_heads=4, intermediate=2816, vocab=32000,
               max_positions=4096)
PEER_PACKAGES = {
    "ort-genai": ["torch==2.13.0", "onnxruntime-genai==0.18.0", "transformers>=4.45,<5.26", "onnx", "onnx-ir",
                  "onnxscript", "safetensors"],
    "openvino": ["torch==2.13.0", "optimum-intel[openvino]==2.2.0", "openvino-genai==2026.4.1.0", "nncf"],
    # optimum-intel 2.2 exports Qwen2.5-VL with transformers 5.0 (VLMPipeline with CDPruner)
    "openvino-vlm": ["torch==2.13.0", "optimum-intel[openvino]==2.2.0", "openvino-genai==2026.4.1.0", "nncf",
                     "transformers==5.0.0", "pillow"],
}
MARK = "@@bench "  # worker replies start with this; anything else a library prints is passed over
VENV_MARKER = ".adatoken-compile-venv"


class UsageError(Exception):
    """Bad input: reported as one ``error:`` line, exit 2."""


# ----------------------------------------------------------------------------- arguments
def _int_list(text: str, what: str, low: int) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{what}: '{text}' is not a comma-separated list of whole numbers ; e.g. --{what} 500,1460")
    if not vals or any(v < low for v in vals):
        raise UsageError(f"--{what}: '{text}' needs whole numbers >= {low} ; e.g. --{what} 500,1460")
    return sorted(set(vals))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--contexts", default="500,1460", help="prompt lengths in tokens [500,1460]")
    ap.add_argument("--precisions", default="fp32,int4", help="fp32, int4 or both [fp32,int4]")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported [3]")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run, EOS ignored [16]")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine [2]")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="where the venvs and built models live")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    args.contexts = _int_list(args.contexts, "contexts", TEXT_HEAD + TEXT_TAIL + 1)
    if max(args.contexts) + args.new_tokens > FIXTURE["max_positions"]:
        raise UsageError(f"--contexts: {max(args.contexts)} + {args.new_tokens} new tokens exceeds the fixture's "
                         f"{FIXTURE['max_positions']} positions ; use contexts <= {FIXTURE['max_positions'] - args.new_tokens}")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise UsageError(f"--precisions: '{args.precisions}' ; use fp32, int4 or fp32,int4")
    args.precisions = [p for p in PRECISIONS if p in precisions]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise UsageError(f"--engines: unknown '{','.join(bad) or args.engines}' ; pick from {','.join(ENGINES)}")
    args.engines = [e for e in ENGINES if e in engines]
    for name, low in (("rounds", 1), ("new_tokens", 2), ("threads", 1)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')}: {getattr(args, name)} ; use a whole number >= {low}")
    return args


# ----------------------------------------------------------------------------- pure parts
def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """BOS then ``n - 1`` seeded ids, none of them BOS / EOS / padding (0-2)."""
    import random

    rng = random.Random(seed * 100_003 + n)
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


def interleaved_order(engines: list[str], contexts: list[int], rounds: int) -> list[tuple[int, int, str]]:
    """(round, context, engine) in run order: every engine once per context per round, the engine
    order rotated each round so no engine always runs right after the same one."""
    order = []
    for r in range(rounds):
        rot = rotated(engines, r)
        for c in contexts:
            order.extend((r, c, e) for e in rot)
    return order


def rotated(items: list, r: int) -> list:
    """``items`` rotated left by ``r``: round r's run order."""
    k = r % len(items)
    return items[k:] + items[:k]


def growth_per_1000(points: dict[int, float]) -> float | None:
    """Least-squares slope of decode ms/token against context tokens, per 1,000 tokens."""
    xs = sorted(points)
    if len(xs) < 2:
        return None
    mx = sum(xs) / len(xs)
    my = sum(points[x] for x in xs) / len(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (points[x] - my) for x in xs) / sxx


def agreement(ref: list[int], other: list[int]) -> dict:
    """Positions where two greedy runs chose the same token, and the length of their common prefix."""
    n = min(len(ref), len(other))
    same = sum(a == b for a, b in zip(ref, other))
    prefix = next((i for i in range(n) if ref[i] != other[i]), n)
    return {"same": same, "of": n, "prefix": prefix}


def summarize(samples: list[dict]) -> dict:
    """Medians per (precision, engine, context) of the timed runs, decode growth, KV bytes and
    the greedy agreement of the unpruned runs with this tool's."""
    out: dict = {}
    for s in samples:
        cell = out.setdefault(s["precision"], {}).setdefault(s["engine"], {}).setdefault(str(s["context"]), {
            "prefill_s": [], "decode_ms": [], "tokens": s["tokens"], "kv_bytes_per_step": s.get("kv_bytes_per_step")})
        cell["prefill_s"].append(s["prefill_s"])
        cell["decode_ms"].append(s["decode_ms"])
    for prec, engines in out.items():
        for eng, ctxs in engines.items():
            for cell in ctxs.values():
                cell["runs"] = len(cell["prefill_s"])
                cell["prefill_s"] = statistics.median(cell["prefill_s"])
                cell["decode_ms"] = statistics.median(cell["decode_ms"])
            engines[eng] = {"contexts": ctxs,
                            "growth_ms_per_1000": growth_per_1000({int(c): v["decode_ms"] for c, v in ctxs.items()})}
        ref = engines.get("ours", {}).get("contexts", {})
        for eng in UNPRUNED_PEERS:
            for c, cell in engines.get(eng, {}).get("contexts", {}).items():
                if c in ref:
                    cell["agreement_with_ours"] = agreement(ref[c]["tokens"], cell["tokens"])
    return out


def _fmt(v: float | None, unit: str, digits: int = 0) -> str:
    return "" if v is None else f"{v:,.{digits}f}{unit}"


def table_rows(summary: dict, contexts: list[int]) -> list[list[str]]:
    """One row per (precision, engine): prefill and decode per context with the ratio to ORT GenAI's,
    growth per 1,000 tokens, KV bytes per step, greedy agreement with this tool's unpruned run."""
    rows = []
    for prec, engines in summary.items():
        base = engines.get("ort-genai", {}).get("contexts", {})
        for eng in ENGINES:
            if eng not in engines:
                continue
            ctxs = engines[eng]["contexts"]
            row = [prec, LABELS[eng]]
            for c in contexts:
                cell = ctxs.get(str(c))
                if cell is None:
                    row += ["", ""]
                    continue
                b = base.get(str(c))
                rp = f" ({cell['prefill_s'] / b['prefill_s']:.2f}x)" if b and eng != "ort-genai" else ""
                rd = f" ({cell['decode_ms'] / b['decode_ms']:.2f}x)" if b and eng != "ort-genai" else ""
                row += [f"{cell['prefill_s']:.2f} s{rp}", f"{cell['decode_ms']:.1f} ms{rd}"]
            row.append(_fmt(engines[eng]["growth_ms_per_1000"], " ms", 1))
            kv = [ctxs[str(c)].get("kv_bytes_per_step") for c in contexts if str(c) in ctxs]
            row.append(" / ".join(f"{k / 1e6:.1f} MB" for k in kv if k is not None) if eng.startswith("ours") else "")
            ag = [ctxs[str(c)].get("agreement_with_ours") for c in contexts if str(c) in ctxs]
            row.append(" / ".join(f"{a['same']}/{a['of']}" for a in ag if a) if eng in UNPRUNED_PEERS else "")
            rows.append(row)
    return rows


def table_header(contexts: list[int]) -> list[str]:
    head = ["precision", "engine"]
    for c in contexts:
        head += [f"prefill {c:,}", f"decode/token at {c:,}"]
    return head + ["decode growth per 1,000", "KV bytes across the session per step",
                   "greedy tokens = this tool's"]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- environments
def venv_commands(peer: str, venv: str, python: str = sys.executable) -> list[list[str]]:
    """The command lines that build one peer's environment (create, install, drop torchvision:
    the index's build does not load with the CPU torch)."""
    py = os.path.join(venv, "bin", "python")
    return [[python, "-m", "venv", venv],
            [py, "-m", "pip", "install", "--quiet", *PEER_PACKAGES[peer]],
            [py, "-m", "pip", "uninstall", "--quiet", "-y", "torchvision"]]


def build_commands(peer: str, venv: str, decoder: str, out: str, precision: str) -> list[str]:
    """The command line that builds a peer's model from the decoder folder."""
    bindir = os.path.join(venv, "bin")
    if peer == "ort-genai":
        return [os.path.join(bindir, "python"), "-m", "onnxruntime_genai.models.builder", "-m", decoder, "-o", out,
                "-p", precision, "-e", "cpu", "-c", os.path.join(os.path.dirname(out), "ort-genai-builder-cache"),
                "--extra_options", f"int4_block_size={INT4_BLOCK}"]
    cmd = [os.path.join(bindir, "optimum-cli"), "export", "openvino", "--model", decoder,
           "--task", "text-generation-with-past", "--weight-format", precision]
    if precision == "int4":
        cmd += ["--ratio", "1.0", "--group-size", str(INT4_BLOCK)]
    return cmd + [out]


def _log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], env: dict | None = None) -> None:
    _log("$ " + shlex.join(cmd))
    subprocess.run(cmd, check=True, env=env)


def ensure_venv(peer: str, cache: str) -> str:
    """The peer's venv, built when missing. A folder there that this script did not build is left
    alone (refused); one whose build stopped half-way is rebuilt."""
    venv = os.path.join(cache, "venvs", peer)
    marker = os.path.join(venv, VENV_MARKER)
    if os.path.exists(marker) and open(marker).read().strip() == "complete":
        return venv
    if os.path.exists(venv) and not os.path.exists(marker):
        raise UsageError(f"{venv}: a folder this script did not build ; move it away or pass another --cache")
    if os.path.exists(venv):
        import shutil

        shutil.rmtree(venv)
    cmds = venv_commands(peer, venv)
    _run(cmds[0])
    with open(marker, "w") as f:
        f.write("building\n")
    for cmd in cmds[1:]:
        _run(cmd)
    with open(marker, "w") as f:
        f.write("complete\n")
    return venv


def _built(path: str, build) -> str:
    """``path`` once built: ``build(tmp)`` writes into a sibling temporary folder renamed on success."""
    if os.path.exists(path):
        return path
    import shutil

    tmp = path + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    build(tmp)
    os.replace(tmp, path)
    return path


def save_decoder(hf_dir: str, out: str) -> None:
    """The LLaVA checkpoint's language model alone as ``LlamaForCausalLM`` (same tensors), with a
    config every transformers version reads (``rope_theta``, not the newer rope dictionary)."""
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(out)
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    pre = "language_model."
    save_file({k[len(pre):]: v.contiguous() for k, v in sd.items() if k.startswith(pre)},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json")) as f:
        t = json.load(f)["text_config"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
           "rope_theta": (t.get("rope_parameters") or {}).get("rope_theta", t.get("rope_theta", 10000.0))}
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act", "bos_token_id",
              "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_bias", "mlp_bias",
              "initializer_range"):
        cfg[k] = t[k]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({k: t[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_dir, name), out)


def code_key() -> str:
    """A digest of this checkout's package source: this tool's artifacts are rebuilt whenever the code
    that writes or runs them changes, so a cached artifact never stands in for the current compiler."""
    h = hashlib.sha256()
    pkg = os.path.join(ROOT, "adatoken_compile")
    for d, dirs, files in sorted(os.walk(pkg)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                h.update(os.path.relpath(os.path.join(d, f), pkg).encode())
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:12]


def drop_stale_artifacts(work: str, code: str) -> list[str]:
    """Remove this script's compiles of other source versions (``ours[-pruned]-PREC-KEY`` holding a
    manifest): each is a full artifact set, and they would otherwise pile up one per code change."""
    import re
    import shutil

    gone = []
    for name in sorted(os.listdir(work)):
        m = re.fullmatch(r"ours(?:-pruned)?-(?:fp32|int4)-([0-9a-f]{12})", name)
        path = os.path.join(work, name)
        if m and m.group(1) != code and os.path.exists(os.path.join(path, "manifest.json")):
            shutil.rmtree(path)
            gone.append(name)
    return gone


def build_all(args) -> dict:
    """Everything the engines load, built where missing: {(precision, engine): model path}."""
    work = os.path.join(args.cache, "work")
    os.makedirs(work, exist_ok=True)
    hf = os.path.join(work, "llava-hf")
    if not os.path.exists(hf):
        from adatoken_compile.models.testing import random_llava_hf

        _log(f"fixture -> {hf}")
        random_llava_hf(hf, **FIXTURE)
    decoder = _built(os.path.join(work, "decoder-llama"), lambda tmp: save_decoder(hf, tmp))
    paths = {}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if {"ours", "ours-pruned"} & set(args.engines):
        sched = os.path.join(work, "schedule-L1-0.7-L2-0.4.json")
        if not os.path.exists(sched):
            from adatoken_compile import api
            from adatoken_compile.schedule import Cut, Schedule

            a = api.load_model(hf, lazy=True)
            Schedule(cuts=[Cut(layer, keep) for layer, keep in CUTS], num_layers=FIXTURE["layers"],
                     fingerprint=a.fingerprint(), family=a.family).save(sched)
        code = code_key()
        for name in drop_stale_artifacts(work, code):
            _log(f"removed {name} (compiled by another version of the source)")
        for prec in args.precisions:
            q = ["--quantize", "int4"] if prec == "int4" else []
            ident = os.path.join(work, f"ours-{prec}-{code}")
            if not os.path.exists(os.path.join(ident, "manifest.json")):
                _run([sys.executable, "-m", "adatoken_compile", "compile", "--model", hf, "--out", ident, *q], env)
            pruned = os.path.join(work, f"ours-pruned-{prec}-{code}")
            if "ours-pruned" in args.engines and not os.path.exists(os.path.join(pruned, "manifest.json")):
                # the encoder and decode graphs do not depend on the schedule
                _run([sys.executable, "-m", "adatoken_compile", "compile", "--model", hf, "--schedule", sched,
                      "--out", pruned, "--reuse", ident, *q], env)
            paths[(prec, "ours")], paths[(prec, "ours-pruned")] = ident, pruned
    for peer, engines in (("ort-genai", ("ort-genai",)), ("openvino", ("openvino-f32", "openvino"))):
        if not set(engines) & set(args.engines):
            continue
        venv = ensure_venv(peer, args.cache)
        for prec in args.precisions:
            out = os.path.join(work, f"{peer}-{prec}")
            _built(out, lambda tmp, p=peer, pr=prec: _run(build_commands(p, venv, decoder, tmp, pr)))
            for e in engines:
                paths[(prec, e)] = out
    return paths


def worker_command(engine: str, model: str, threads: int, cache: str) -> list[str]:
    if engine.startswith("ours"):
        python = sys.executable
    else:
        python = os.path.join(cache, "venvs", "ort-genai" if engine == "ort-genai" else "openvino", "bin", "python")
    return [python, os.path.abspath(__file__), "--out", "-", "--worker", engine, "--model", model,
            "--threads", str(threads)]


# ----------------------------------------------------------------------------- workers
def _ours(model: str, threads: int):
    sys.path.insert(0, ROOT)  # this checkout's runtime
    import numpy as np

    from adatoken_compile.runtime import load

    rt = load(model, "cpu", threads=threads)

    def run(ids: list[int], new_tokens: int) -> dict:
        n = len(ids)
        spatial = np.zeros((1, n), bool)
        spatial[0, TEXT_HEAD : n - TEXT_TAIL] = True
        feeds = {"inputs_embeds": rt.embed[np.asarray(ids)][None], "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None], "spatial_mask": spatial,
                 "spatial_xyz": np.zeros((1, n, 3), np.float32)}
        steps, toks = [], []
        t = time.perf_counter()
        for tok in rt.generate_ids(feeds, max_new_tokens=new_tokens, ignore_eos=True):
            now = time.perf_counter()
            steps.append(now - t)
            toks.append(int(tok[0]))
            t = time.perf_counter()
        transfer = getattr(rt, "last_transfer", None)
        if transfer is not None and "kv_bytes_per_step" in transfer:
            kv = transfer["kv_bytes_per_step"]
        else:
            # the numpy loop feeds every past K/V and gets every present K/V (one position longer)
            # back: the bytes of the first decode step at this context
            kv = rt.kv_cache_bytes(new_tokens=0)[0] + rt.kv_cache_bytes(new_tokens=1)[0]
        return {"prefill_s": steps[0], "decode_ms": 1000 * statistics.mean(steps[1:]), "tokens": toks,
                "kv_bytes_per_step": int(kv)}

    return run, {"precision": rt.precision, "providers": rt.providers,
                 "cuts": [[c.layer, c.keep] for c in rt.schedule.cuts]}


def _ort_genai(model: str, threads: int):
    import numpy as np
    import onnxruntime_genai as og

    cfg_path = os.path.join(model, "genai_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    opts = cfg["model"]["decoder"]["session_options"]
    if opts.get("intra_op_num_threads") != threads:  # the folder is this script's build
        opts["intra_op_num_threads"] = threads
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=4)
    m = og.Model(og.Config(model))

    def run(ids: list[int], new_tokens: int) -> dict:
        p = og.GeneratorParams(m)
        total = len(ids) + new_tokens
        # min_length keeps EOS from ending the run early (this tool ignores EOS instead)
        p.set_search_options(max_length=total, min_length=total, do_sample=False)
        g = og.Generator(m, p)
        t = time.perf_counter()
        g.append_tokens(np.asarray(ids, np.int32))
        g.generate_next_token()  # the prompt's logits are there: this picks the first token
        prefill = time.perf_counter() - t
        toks = [int(g.get_next_tokens()[0])]
        steps = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            g.generate_next_token()
            steps.append(time.perf_counter() - t)
            toks.append(int(g.get_next_tokens()[0]))
        return {"prefill_s": prefill, "decode_ms": 1000 * statistics.mean(steps), "tokens": toks}

    return run, {"onnxruntime_genai": og.__version__}


def _openvino(model: str, threads: int, f32: bool):
    import numpy as np
    import openvino as ov
    import openvino_genai as ovg

    sched, props, info = openvino_setup(threads, f32)
    pipe = ovg.LLMPipeline(model, "CPU", scheduler_config=sched, **props)

    def run(ids: list[int], new_tokens: int) -> dict:
        gc = pipe.get_generation_config()
        gc.max_new_tokens = gc.min_new_tokens = new_tokens
        gc.ignore_eos, gc.do_sample = True, False
        a = np.asarray([ids], np.int64)
        res = pipe.generate(ovg.TokenizedInputs(ov.Tensor(a), ov.Tensor(np.ones_like(a))), gc)
        pm = res.perf_metrics
        return {"prefill_s": pm.get_ttft().mean / 1000, "decode_ms": pm.get_tpot().mean,
                "tokens": [int(t) for t in res.tokens[0]]}

    return run, info


def openvino_setup(threads: int, f32: bool):
    """(scheduler config, pipeline properties, what they mean on this CPU) of an OpenVINO GenAI
    pipeline: prefix caching off, ``threads`` inference threads, f32 compute when ``f32`` (else the
    plugin's default: bf16 where the CPU has it, u8 KV cache)."""
    import openvino as ov
    import openvino_genai as ovg

    sched = ovg.SchedulerConfig()
    sched.enable_prefix_caching = False
    props = {"INFERENCE_NUM_THREADS": threads}
    if f32:
        props["INFERENCE_PRECISION_HINT"] = "f32"
    core = ov.Core()
    return sched, props, {"openvino_genai": ovg.__version__, "properties": props,
                          "cpu_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                          "cpu_default_precision": str(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
                          "cpu_default_kv_cache": str(core.get_property("CPU", "KV_CACHE_PRECISION"))}


def serve(load) -> None:
    """A worker's life: ``load()`` gives (run, info); then one JSON request a line on stdin, each
    answered with ``run(**request)`` on stdout after :data:`MARK`."""
    t = time.perf_counter()
    run, info = load()
    print(MARK + json.dumps({"ready": True, "load_s": time.perf_counter() - t, "info": info}, default=str), flush=True)
    for line in sys.stdin:
        print(MARK + json.dumps(run(**json.loads(line))), flush=True)


def worker(engine: str, model: str, threads: int) -> None:
    """Load one engine, then answer one JSON request a line on stdin ({"ids", "new_tokens"})."""
    if engine.startswith("ours"):
        serve(lambda: _ours(model, threads))
    elif engine == "ort-genai":
        serve(lambda: _ort_genai(model, threads))
    else:
        serve(lambda: _openvino(model, threads, f32=engine == "openvino-f32"))


class Worker:
    def __init__(self, engine: str, cmd: list[str], env: dict):
        self.engine = engine
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = self._reply()
        self.load_s, self.info = ready["load_s"], ready.get("info")

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"{self.engine}: worker ended (exit {self.proc.wait()}); its messages are above")

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def run(self, ids: list[int], new_tokens: int) -> dict:
        return self.request(ids=ids, new_tokens=new_tokens)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------- driver
def measure(args, paths: dict) -> tuple[list[dict], dict]:
    """The timed runs, and what each engine reported about itself when it loaded.

    Every round starts a fresh worker process per engine: the same decode graph in five processes
    of one machine ran 18.3-23.1 ms a step (medians; within a process the steps spread by a few
    percent), so one process per engine for the whole run put a bias of up to a fifth on one engine
    that no number of rounds removes."""
    samples, infos = [], {}
    env = dict(os.environ)
    order = interleaved_order(args.engines, args.contexts, args.rounds)
    for prec in args.precisions:
        for r in range(args.rounds):
            # one precision's workers at a time: five engines of one precision fit the memory
            workers = {}
            try:
                for e in args.engines:
                    workers[e] = Worker(e, worker_command(e, paths[(prec, e)], args.threads, args.cache), env)
                    _log(f"{prec} round {r} {e}: loaded in {workers[e].load_s:.1f} s")
                    infos.setdefault(f"{prec} {e}", {**(workers[e].info or {}), "load_s": []})["load_s"].append(
                        round(workers[e].load_s, 2))
                warm = prompt_ids(min(args.contexts), FIXTURE["vocab"], seed=1)
                for e, w in workers.items():  # first runs pay one-off allocations
                    w.run(warm, 2)
                for _, c, e in (x for x in order if x[0] == r):
                    res = workers[e].run(prompt_ids(c, FIXTURE["vocab"]), args.new_tokens)
                    # the machine may be shared: its load beside each figure says how far to trust it
                    res.update(precision=prec, engine=e, context=c, round=r, load_avg_1min=round(os.getloadavg()[0], 2))
                    samples.append(res)
                    _log(f"{prec} round {r} {c:>5} {e:<13} prefill {res['prefill_s']:.2f} s  "
                         f"decode {res['decode_ms']:.1f} ms/token")
            finally:
                for w in workers.values():
                    w.close()
    return samples, infos


def write_results(args, samples: list[dict], engines: dict | None = None) -> str:
    summary = summarize(samples)
    header, rows = table_header(args.contexts), table_rows(summary, args.contexts)
    md = markdown(header, rows)
    os.makedirs(args.out, exist_ok=True)
    meta = {"contexts": args.contexts, "precisions": args.precisions, "engines": args.engines,
            "rounds": args.rounds, "new_tokens": args.new_tokens, "threads": args.threads, "fixture": FIXTURE,
            "cuts": CUTS, "command": shlex.join([sys.executable, *sys.argv]), "cpus": os.cpu_count(),
            "load_avg_1min": [min(x["load_avg_1min"] for x in samples), max(x["load_avg_1min"] for x in samples)]}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "engines": engines or {}, "summary": summary, "samples": samples}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"`{meta['command']}`\n\nmedians of {args.rounds} interleaved rounds, {args.threads} threads, "
                f"{args.new_tokens} new tokens; ratios against ONNX Runtime GenAI at the same precision; "
                f"load average (1 min) {meta['load_avg_1min'][0]:.1f}-{meta['load_avg_1min'][1]:.1f} "
                f"on {meta['cpus']} CPUs\n\n{md}")
    return md


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.worker:
            worker(args.worker, args.model, args.threads)
            return 0
        sys.path.insert(0, ROOT)  # this checkout's package builds the fixture and the schedule
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"{args.out}: not a folder ; pass a folder for --out")
        paths = build_all(args)
        samples, engines = measure(args, paths)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_results(args, samples, engines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
