"""Side by side with OpenVINO GenAI's CDPruner on one Qwen2.5-VL checkpoint: accuracy, time to first
token and visual tokens kept, this tool's artifacts next to ``VLMPipeline`` with and without CDPruner.

    python scripts/bench_cdpruner.py --model DIR --data q.jsonl --out runs/cdpruner
        [--ratios 50,75,90] [--flops-of 75] [--prellm-rules random,diverse] [--openvino f32,default]
        [--rounds 3] [--threads 2] [--new-tokens 8] [--limit N] [--relevance-weight W]
        [--schedule schedule.json | --cal-data FILE --cal-samples 8 --cal-holdout 16 --cal-rules last_token,stratified]
    python scripts/bench_cdpruner.py --make-questions DIR [--images 12] [--sides 40,220]   # 36 questions, 12 images

What it builds (each kept under ``--cache`` and reused while its inputs are unchanged):
- OpenVINO GenAI's environment: a virtual environment with openvino-genai, optimum-intel 2.2 and the
  transformers 5.0 that exports Qwen2.5-VL, a local CPU torch (scripts/bench_peers.py builds it);
- the OpenVINO model: ``optimum-cli export openvino --task image-text-to-text --weight-format fp32``
  of DIR, once per checkpoint (keyed by its files); an export without the tokenizer models or the
  image processor's config gets them written beside it;
- this tool's artifacts (``compile``, per digest of this checkout's source): unpruned; one cut before
  layer 0 keeping ``1 - ratio`` of the visual tokens for every ratio and ``--prellm-rules`` rule (the
  tokens CDPruner keeps at that ratio, up to rounding: it keeps round(N (1 - ratio)), a cut
  ceil(N (1 - ratio))); and the calibrated schedule at the prefill FLOPs of a cut before layer 0 at
  ``--flops-of`` (``calibrate --flops-budget B``, B counted on the questions' mean token counts).

What runs: every question through every configuration, greedy, ``--new-tokens`` at most (EOS ends
an answer). OpenVINO: ``VLMPipeline`` (prefix caching off) at ``pruning_ratio`` 0 and each ratio,
once with ``INFERENCE_PRECISION_HINT=f32`` and once at the plugin's default (bf16 compute where
the CPU has it), and unpruned once more with every image resized beforehand by Pillow to the
processor's size (OpenVINO GenAI resizes with its own code; given the resized pixels, both runtimes
see the same ones, which separates the resize from the model in the parity). Rounds are interleaved: each round starts one worker process per runtime (one
per artifact, one per OpenVINO precision), in an order rotated every round, all on ``--threads``.

What it reports per configuration: visual tokens kept (this tool: counted on its prefill graph's
masks; OpenVINO: the prompt tokens its perf metrics count, less the unpruned prompt's), the prefill
FLOPs ratio (:mod:`adatoken_compile.flops`, the LLM prefill; CDPruner's own selection not counted),
time to first token (images decoded beforehand; preprocessing, vision tower, selection and prefill
included) and its vision + embedding part, medians over questions and rounds; accuracy as ``eval``
scores it (first word against the reference answers, of the answers decoded by the checkpoint's
tokenizer) with a paired 95% interval against the calibrated schedule; and parity: the unpruned
greedy tokens of each OpenVINO precision against this tool's unpruned artifact, question by question.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_peers as bp  # noqa: E402  (the peers' environments, workers and helpers)

ROOT = bp.ROOT
PEER = "openvino-vlm"
OPENVINO_MODES = {"f32": "openvino-f32", "default": "openvino"}
OV_LABELS = {"openvino-f32": "OpenVINO GenAI f32", "openvino": "OpenVINO GenAI default precision"}
SMALL_FILE = 4 << 20  # checkpoint files up to this size are hashed whole; larger ones by size and mtime
COLORS = ("red", "green", "blue", "yellow", "white", "black")


class UsageError(bp.UsageError):
    pass


# ----------------------------------------------------------------------------- arguments
def _ratios(text: str) -> list[int]:
    try:
        vals = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        vals = []
    if not vals or any(not 1 <= v <= 99 for v in vals):
        raise UsageError(f"--ratios: '{text}' ; give pruning percentages 1-99, e.g. --ratios 50,75,90")
    return vals


def _names(text: str, allowed, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise UsageError(f"--{what}: unknown '{','.join(bad) or text}' ; pick from {','.join(allowed)}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Qwen2.5-VL checkpoint folder")
    ap.add_argument("--data", help="question file with images (docs/data.md)")
    ap.add_argument("--out", help="folder for results.json and results.md")
    ap.add_argument("--ratios", default="50,75,90", help="CDPruner pruning percentages [50,75,90]")
    ap.add_argument("--flops-of", type=int, default=75,
                    help="the calibrated schedule gets the prefill FLOPs of pruning this percentage before the LLM [75]")
    ap.add_argument("--prellm-rules", default="random,diverse",
                    help="this tool's rules for the cuts before layer 0 at the ratios' token counts [random,diverse]")
    ap.add_argument("--openvino", default="f32,default", help="OpenVINO precisions: f32, default or both [f32,default]")
    ap.add_argument("--relevance-weight", type=float, default=None,
                    help="CDPruner's relevance_weight (default: OpenVINO GenAI's)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported [3]")
    ap.add_argument("--threads", type=int, default=2, help="inference threads of every runtime [2]")
    ap.add_argument("--new-tokens", type=int, default=8, help="longest answer in tokens [8]")
    ap.add_argument("--limit", type=int, default=None, help="the first N questions of --data")
    ap.add_argument("--schedule", default=None, help="a calibrated schedule.json to use instead of calibrating")
    ap.add_argument("--cal-data", default=None, help="questions calibrate mines and validates on [--data]")
    ap.add_argument("--cal-samples", type=int, default=8, help="calibrate --samples [8]")
    ap.add_argument("--cal-holdout", type=int, default=16, help="calibrate --holdout [16]")
    ap.add_argument("--cal-rules", default="last_token,stratified", help="calibrate --rules [last_token,stratified]")
    ap.add_argument("--cache", default=bp.DEFAULT_CACHE, help="where the environment, exports and artifacts live")
    ap.add_argument("--make-questions", default=None, metavar="DIR",
                    help="only write a question file of random images (DIR/q.jsonl) and stop")
    ap.add_argument("--images", type=int, default=12, help="with --make-questions: images (3 questions each) [12]")
    ap.add_argument("--sides", default="40,220", help="with --make-questions: the images' sides in pixels, LO,HI [40,220]")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--convert-tokenizer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker or args.convert_tokenizer:
        return args
    if args.make_questions:
        if args.images < 1:
            raise UsageError(f"--images: {args.images} ; use a whole number >= 1")
        try:
            args.sides = tuple(int(x) for x in args.sides.split(","))
        except ValueError:
            args.sides = ()
        if len(args.sides) != 2 or not 8 <= args.sides[0] <= args.sides[1] <= 4096:
            raise UsageError(f"--sides: '{args.sides}' ; give LO,HI pixels, 8 <= LO <= HI <= 4096, e.g. --sides 40,220")
        return args
    missing = [f"--{k}" for k in ("model", "data", "out") if not getattr(args, k)]
    if missing:
        raise UsageError(f"{' '.join(missing)} missing ; e.g. --model tiny-qwen --data q.jsonl --out runs/cdpruner")
    args.ratios = _ratios(args.ratios)
    if not 1 <= args.flops_of <= 99:
        raise UsageError(f"--flops-of: {args.flops_of} ; give a pruning percentage 1-99, e.g. --flops-of 75")
    args.openvino = [OPENVINO_MODES[m] for m in _names(args.openvino, OPENVINO_MODES, "openvino")]
    from adatoken_compile.selection import RULES, at_layer, pre_llm

    prellm = [r for r in RULES if pre_llm(r, at_layer(r, 0).params_dict())]
    args.prellm_rules = _names(args.prellm_rules, prellm, "prellm-rules")
    if args.relevance_weight is not None and not 0.0 <= args.relevance_weight <= 1.0:
        raise UsageError(f"--relevance-weight: {args.relevance_weight} ; CDPruner takes 0.0-1.0")
    for name, low in (("rounds", 1), ("threads", 1), ("new_tokens", 1), ("cal_samples", 1), ("cal_holdout", 1)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')}: {getattr(args, name)} ; use a whole number >= {low}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: {args.limit} ; use a whole number >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"{args.out}: not a folder ; pass a folder for --out")
    for flag, path in (("--model", args.model), ("--schedule", args.schedule)):
        if path and not os.path.exists(path):
            raise UsageError(f"{path}: not found ; pass an existing {flag}")
    return args


# ----------------------------------------------------------------------------- pure parts
def checkpoint_key(folder: str) -> str:
    """A digest of a checkpoint folder: small files (configs, tokenizer) by content, large ones
    (weights) by name, size and modification time, so that the export is redone when it changes."""
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, folder)}\0{st.st_size}\0".encode())
            if st.st_size <= SMALL_FILE:
                with open(p, "rb") as fh:
                    h.update(fh.read())
            else:
                h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:12]


def plan(ratios: list[int], rules: list[str], modes: list[str]) -> list[dict]:
    """The configurations, in table order: {"name", "engine" (the worker that runs it), "ratio"
    (OpenVINO's pruning_ratio, or the percentage a cut before layer 0 prunes), "rule", "label",
    "presize" (OpenVINO given the images resized to the processor's size by Pillow, as this tool
    resizes them)}."""
    out = [{"name": "ours:unpruned", "engine": "ours:unpruned", "ratio": 0, "rule": None,
            "label": "this tool, unpruned"},
           {"name": "ours:calibrated", "engine": "ours:calibrated", "ratio": None, "rule": None,
            "label": "this tool, calibrated (calibrate --flops-budget)"}]
    for r in ratios:
        for rule in rules:
            name = f"ours:prellm-{rule}@{r}"
            out.append({"name": name, "engine": name, "ratio": r, "rule": rule,
                        "label": f"this tool, {rule} before layer 0, {r}% pruned"})
    for m in modes:
        for r in [0] + ratios:
            out.append({"name": f"{m}:{r}", "engine": m, "ratio": r, "rule": None,
                        "label": f"{OV_LABELS[m]}, " + (f"CDPruner {r}%" if r else "unpruned")})
        # its own resize differs from Pillow's: given images already at the processor's size, both
        # runtimes' pixels are the same
        out.append({"name": f"{m}:0:resized", "engine": m, "ratio": 0, "rule": None, "presize": True,
                    "label": f"{OV_LABELS[m]}, unpruned, images resized by Pillow beforehand"})
    return out


def ov_kept(n_visual: int, n_input_unpruned: int, n_input_pruned: int) -> int:
    """Visual tokens OpenVINO kept: its prompt count drops by the pruned visual tokens."""
    return n_visual - (n_input_unpruned - n_input_pruned)


def strip_eos(tokens: list[int], eos) -> list[int]:
    """The answer's tokens: up to the first end-of-sequence token."""
    eos = set(eos if isinstance(eos, (list, tuple, set)) else [eos]) - {None}
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return list(tokens)


def parity(ref: dict[int, list[int]], other: dict[int, list[int]]) -> dict:
    """Question by question, two runtimes' greedy tokens: questions alike, and tokens alike."""
    qs = sorted(set(ref) & set(other))
    same_q = sum(ref[q] == other[q] for q in qs)
    agree = [bp.agreement(ref[q], other[q]) for q in qs]
    return {"questions": len(qs), "identical": same_q, "tokens_same": sum(a["same"] for a in agree),
            "tokens_of": sum(max(len(ref[q]), len(other[q])) for q in qs),
            "first_differences": {q: a["prefix"] for q, a in zip(qs, agree) if ref[q] != other[q]}}


def _median(xs):
    return statistics.median(xs) if xs else None


def first_runs(samples: list[dict]) -> dict:
    """{(config, question): its first run} (the earliest round: samples are in run order)."""
    first = {}
    for s in samples:
        first.setdefault((s["config"], s["q"]), s)
    return first


def kept_tokens(c: dict, q: int, first: dict) -> int | None:
    """Visual tokens configuration ``c`` kept on question ``q`` (None when not measured)."""
    s = first.get((c["name"], q))
    if s is None:
        return None
    if c["engine"].startswith("ours"):
        return s["spatial_per_layer"][0]
    base, vis = first.get((f"{c['engine']}:0", q)), first.get(("ours:unpruned", q))
    return None if base is None or vis is None else ov_kept(vis["n_visual"], base["n_input"], s["n_input"])


def summarize(samples: list[dict], configs: list[dict], questions: list[dict], texts: dict, flops: dict) -> dict:
    """Per configuration: medians of time to first token and of its vision + embedding part, mean
    visual tokens kept, prefill FLOPs ratio, the first round's answers' accuracy, the paired
    comparison with the calibrated schedule and the agreement with its runtime's unpruned answers;
    and the parity of the unpruned greedy tokens. ``texts[(config, q)]``: the decoded answers;
    ``flops``: config -> FLOPs ratio (None where not known)."""
    from adatoken_compile.evaluation.accuracy import agreement, hit, paired

    by = {}
    for s in samples:
        by.setdefault(s["config"], []).append(s)
    first = first_runs(samples)
    n_visual = {q: first[("ours:unpruned", q)]["n_visual"] for q in range(len(questions))
                if ("ours:unpruned", q) in first}

    def preds(name):
        return [{"question": questions[q]["question"], "answers": questions[q]["answers"],
                 "prediction": texts.get((name, q), "")} for q in range(len(questions))]

    out = {"configs": {}, "parity": {}}
    cal = preds("ours:calibrated") if "ours:calibrated" in by else None
    for c in configs:
        rows = by.get(c["name"])
        if not rows:
            continue
        ks = [k for k in (kept_tokens(c, q, first) for q in range(len(questions))) if k is not None]
        per_layer = [first[(c["name"], q)].get("spatial_per_layer") for q in range(len(questions))
                     if (c["name"], q) in first]
        p = preds(c["name"])
        scored = [hit(x["prediction"], x["answers"]) for x in p if x["answers"]]
        unpruned = "ours:unpruned" if c["engine"].startswith("ours") else f"{c['engine']}:0"
        tokens_by_round = {}
        for s in rows:
            tokens_by_round.setdefault(s["q"], set()).add(tuple(s["tokens"]))
        out["configs"][c["name"]] = {
            "label": c["label"], "ratio": c["ratio"], "rule": c["rule"], "runs": len(rows),
            "ttft_ms": 1000 * _median([s["ttft_s"] for s in rows]),
            "embed_ms": 1000 * _median([s["embed_s"] for s in rows]),
            "kept_mean": sum(ks) / len(ks) if ks else None,
            "visual_mean": sum(n_visual.values()) / len(n_visual) if n_visual else None,
            "kept_per_layer": ([sum(col) / len(col) for col in zip(*per_layer)]
                               if per_layer and all(per_layer) else None),
            "flops_ratio": flops.get(c["name"]),
            "accuracy": sum(scored) / len(scored) if scored else None, "scored": len(scored),
            "vs_calibrated": paired(p, cal) if cal is not None and c["name"] != "ours:calibrated" else None,
            "agreement_with_unpruned": agreement(p, preds(unpruned)) if unpruned in by else None,
            "rounds_differ": sum(len(v) > 1 for v in tokens_by_round.values()),
        }
    ref = {q: first[("ours:unpruned", q)]["tokens"] for q in range(len(questions)) if ("ours:unpruned", q) in first}
    for c in configs:
        if c["engine"].startswith("ours") or c["ratio"]:
            continue
        other = {q: first[(c["name"], q)]["tokens"] for q in range(len(questions)) if (c["name"], q) in first}
        if other and ref:
            par = parity(ref, other)
            par["prompt_lengths_equal"] = sum(first[("ours:unpruned", q)]["n_input"] == first[(c["name"], q)]["n_input"]
                                              for q in other if q in ref)
            out["parity"][c["name"]] = {"label": c["label"], **par}
    return out


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def kept_text(c: dict) -> str:
    """Visual tokens kept before layer 0, then where the in-LLM cuts drop more: "23.1 of 23.1, 1.0 from L1"."""
    if c["kept_mean"] is None:
        return ""
    text = f"{c['kept_mean']:.1f} of {c['visual_mean']:.1f}"
    pl = c.get("kept_per_layer") or []
    return text + "".join(f", {pl[i]:.1f} from L{i}" for i in range(1, len(pl)) if pl[i] < pl[i - 1])


def markdown(summary: dict) -> str:
    head = ["configuration", "visual tokens kept (mean, of)", "prefill FLOPs ratio", "time to first token (median)",
            "of which vision + embeddings", "accuracy", "vs calibrated: delta [paired 95% CI]",
            "answers = its runtime's unpruned"]
    rows = []
    for c in summary["configs"].values():
        v = c["vs_calibrated"]
        rows.append([
            c["label"],
            kept_text(c),
            "" if c["flops_ratio"] is None else f"{c['flops_ratio']:.3f}",
            f"{c['ttft_ms']:.1f} ms", f"{c['embed_ms']:.1f} ms",
            "" if c["accuracy"] is None else f"{_pct(c['accuracy'])} (n={c['scored']})",
            "" if v is None else (f"{v['delta_points']:+.1f} [{v['delta_ci95_points'][0]:+.1f}, "
                                  f"{v['delta_ci95_points'][1]:+.1f}]"),
            "" if c["agreement_with_unpruned"] is None else _pct(c["agreement_with_unpruned"]),
        ])
    md = bp.markdown(head, rows)
    for p in summary["parity"].values():
        md += (f"\nparity of the greedy tokens, {p['label']} vs this tool unpruned: {p['identical']}/{p['questions']} "
               f"questions identical, {p['tokens_same']}/{p['tokens_of']} tokens; prompt lengths equal on "
               f"{p['prompt_lengths_equal']}/{p['questions']}\n")
    return md


# ----------------------------------------------------------------------------- questions
def make_questions(folder: str, images: int = 12, seed: int = 0, sides: tuple[int, int] = (40, 220)) -> str:
    """A question file of ``images`` random images (``sides`` pixels a side, coloured boxes on noise),
    three questions each, a quarter of them about two images; answers from what was drawn."""
    import random

    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    drawn = []
    for i in range(images):
        h, w = rng.randint(*sides), rng.randint(*sides)
        img = nrng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        color = rng.choice(COLORS)
        rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30),
               "white": (250, 250, 250), "black": (5, 5, 5)}[color]
        count = rng.randint(1, 3)
        for _ in range(count):
            y, x = rng.randrange(h // 2 + 1), rng.randrange(w // 2 + 1)
            img[y : y + max(4, h // 4), x : x + max(4, w // 4)] = rgb
        name = f"img{i:02d}.png"
        Image.fromarray(img).save(os.path.join(folder, name))
        drawn.append((name, color, count))
    rows = []
    for i, (name, color, count) in enumerate(drawn):
        rows.append({"image": name, "question": "what color is the box?", "answers": [color], "type": "color"})
        rows.append({"image": name, "question": "how many boxes are there?", "answers": [str(count)], "type": "count"})
        other = drawn[(i + 1) % len(drawn)]
        if i % 4 == 3 and other[1] != color:
            rows.append({"image": [name, other[0]], "question": f"which image shows the {color} box, first or second?",
                         "answers": ["first"], "type": "two images"})
        else:
            rows.append({"image": name, "question": f"is there a {color} box?", "answers": ["yes"], "type": "yes/no"})
    path = os.path.join(folder, "q.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def load_questions(path: str, limit: int | None) -> list[dict]:
    """The image questions of a question file as {"question", "images" (absolute paths), "answers"};
    a scene or a video is refused (CDPruner in OpenVINO GenAI prunes images)."""
    from adatoken_compile.data.questions import read_questions
    from adatoken_compile.runtime.sample import Video

    out = []
    for s in read_questions(path)[:limit]:
        imgs = s.image if isinstance(s.image, list) else [s.image]
        if s.image is None or any(isinstance(i, Video) for i in imgs):
            raise UsageError(f"{path}: question {s.meta.get('id')!r} is about a "
                             f"{'scene' if s.image is None else 'video'} ; this comparison takes image questions "
                             "(OpenVINO GenAI's CDPruner prunes images only)")
        out.append({"question": s.question, "images": [os.path.abspath(i.path) for i in imgs],
                    "answers": list(s.meta.get("answers") or [])})
    return out


# ----------------------------------------------------------------------------- building
def _export_openvino(venv: str, model: str, out: str) -> None:
    bp._run([os.path.join(venv, "bin", "optimum-cli"), "export", "openvino", "--model", model,
             "--task", "image-text-to-text", "--weight-format", "fp32", out])
    complete_export(venv, model, out)


def complete_export(venv: str, model: str, out: str) -> None:
    """What ``VLMPipeline`` loads and an export may lack: ``preprocessor_config.json`` (from a nested
    ``processor_config.json``, else the checkpoint's) and the tokenizer models."""
    pre = os.path.join(out, "preprocessor_config.json")
    if not os.path.exists(pre):  # some exports keep the image processor inside processor_config.json
        proc = os.path.join(out, "processor_config.json")
        nested = json.load(open(proc)).get("image_processor") if os.path.exists(proc) else None
        src = os.path.join(model, "preprocessor_config.json")
        if nested is None and os.path.exists(src):
            nested = json.load(open(src))
        if nested is None:
            raise UsageError(f"{model}: no image processor config ; the checkpoint needs preprocessor_config.json")
        with open(pre, "w") as f:
            json.dump(nested, f, indent=2)
    if not all(os.path.exists(os.path.join(out, f"openvino_{k}.xml")) for k in ("tokenizer", "detokenizer")):
        bp._run([os.path.join(venv, "bin", "python"), os.path.abspath(__file__), "--convert-tokenizer", model,
                 "--out", out])


def convert_tokenizer(model: str, out: str) -> None:
    """The tokenizer models OpenVINO GenAI loads. openvino-tokenizers reads a ``Punctuation``
    pre-tokenizer's behaviour ``Isolated`` as a split mode it does not have ('isolated'; its own
    name is 'isolate'): the name is mapped before conversion."""
    import openvino as ov
    import openvino_tokenizers as ovt
    import openvino_tokenizers.tokenizer_pipeline as tp
    from transformers import AutoTokenizer

    orig = tp.RegexSplitStep.punctuation_splitter.__func__
    tp.RegexSplitStep.punctuation_splitter = classmethod(
        lambda cls, behaviour="isolate": orig(cls, behaviour.lower().removesuffix("d")))
    tok, detok = ovt.convert_tokenizer(AutoTokenizer.from_pretrained(model), with_detokenizer=True)
    ov.save_model(tok, os.path.join(out, "openvino_tokenizer.xml"))
    ov.save_model(detok, os.path.join(out, "openvino_detokenizer.xml"))


def _cli(args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    bp._run([sys.executable, "-m", "adatoken_compile", *args], env)


def token_counts(rt, questions: list[dict]) -> list[tuple[int, int]]:
    """(visual, text) tokens of each question's prompt, from the image sizes and the prompt alone;
    each question's ``resized`` gets the processor's [width, height, Pillow filter] of its images."""
    import numpy as np
    from PIL import Image

    from adatoken_compile.runtime.prompt import IMAGE_TOKEN_INDEX

    proc = rt.processing
    out = []
    for q in questions:
        n = 0
        q["resized"] = []
        for p in q["images"]:
            if p.endswith(".npy"):
                h, w = np.load(p, mmap_mode="r").shape[:2]
            else:
                with Image.open(p) as im:
                    w, h = im.size
            hh, ww = proc.resized_hw(h, w)
            q["resized"].append([ww, hh, proc.resample])
            n += (hh // proc.factor) * (ww // proc.factor)
        ids = rt.prompt_ids(q["question"], len(q["images"]))
        out.append((n, len(ids) - ids.count(IMAGE_TOKEN_INDEX)))
    return out


def build_all(args, configs: list[dict], questions: list[dict]) -> dict:
    """{engine: model folder} for every worker, building what is missing; and what the report
    needs of the unpruned artifact (arch, schedules, the FLOPs budget, calibrate's choice)."""
    from adatoken_compile.flops import schedule_flops_ratio
    from adatoken_compile.runtime import load
    from adatoken_compile.schedule import Cut, Schedule
    from adatoken_compile.selection import Rule, at_layer

    key = checkpoint_key(args.model)
    work = os.path.join(args.cache, "work", f"qwen25vl-{key}")
    os.makedirs(work, exist_ok=True)
    paths = {}
    if args.openvino:
        venv = bp.ensure_venv(PEER, args.cache)
        ov_model = bp._built(os.path.join(work, "openvino-fp32"), lambda tmp: _export_openvino(venv, args.model, tmp))
        paths.update({m: ov_model for m in args.openvino})
    code = bp.code_key()
    ident = os.path.join(work, f"ours-unpruned-{code}")
    if not os.path.exists(os.path.join(ident, "manifest.json")):
        _cli(["compile", "--model", args.model, "--out", ident, "--overwrite"])
    paths["ours:unpruned"] = ident
    rt = load(ident, "cpu", threads=args.threads)
    L = rt.num_layers
    model = dict(fingerprint=rt.manifest.fingerprint, family=rt.family)
    schedules = {"ours:unpruned": Schedule(cuts=[], num_layers=L, **model)}
    counts = token_counts(rt, questions)
    n_mean = sum(n for n, _ in counts) / len(counts)
    t_mean = sum(t for _, t in counts) / len(counts)
    budget = schedule_flops_ratio(rt.arch, Schedule(cuts=[Cut(0, 1 - args.flops_of / 100, Rule.of("random"))],
                                                    num_layers=L), n_mean, t_mean)
    arch, tokenizer = rt.arch, rt.tokenizer
    del rt  # the workers load the artifacts; this process keeps the tokenizer alone

    def compiled(name: str, schedule_path: str) -> str:
        art = os.path.join(work, f"{name}-{code}")
        if not os.path.exists(os.path.join(art, "manifest.json")):
            # the encoder and decode graphs do not depend on the schedule
            _cli(["compile", "--model", args.model, "--schedule", schedule_path, "--out", art, "--reuse", ident,
                  "--overwrite"])
        return art

    for c in configs:
        if c["rule"] is None:
            continue
        s = Schedule(cuts=[Cut(0, 1 - c["ratio"] / 100, at_layer(c["rule"], 0))], num_layers=L,
                     policy=f"prellm-{c['rule']}", **model).validate(c["name"])
        sp = os.path.join(work, f"schedule-prellm-{c['rule']}-{c['ratio']}.json")
        s.save(sp)
        schedules[c["name"]] = s
        paths[c["engine"]] = compiled(f"ours-prellm-{c['rule']}-{c['ratio']}", sp)
    if args.schedule:
        sched_path = args.schedule
    else:
        cal_data = args.cal_data or args.data
        st = os.stat(cal_data)
        ck = hashlib.sha256(json.dumps([code, os.path.abspath(cal_data), st.st_size, st.st_mtime_ns, round(budget, 6),
                                        args.cal_samples, args.cal_holdout, args.cal_rules]).encode()).hexdigest()[:12]
        cal_dir = os.path.join(work, f"calibration-{ck}")
        if not os.path.exists(os.path.join(cal_dir, "schedule.json")):
            _cli(["calibrate", "--model", args.model, "--data", cal_data, "--out", cal_dir, "--overwrite",
                  "--flops-budget", f"{budget:.6f}", "--samples", str(args.cal_samples), "--holdout",
                  str(args.cal_holdout), "--rules", args.cal_rules])
        sched_path = os.path.join(cal_dir, "schedule.json")
    schedules["ours:calibrated"] = Schedule.load(sched_path)
    digest = hashlib.sha256(open(sched_path, "rb").read()).hexdigest()[:12]
    paths["ours:calibrated"] = compiled(f"ours-calibrated-{digest}", sched_path)
    return {"paths": paths, "arch": arch, "schedules": schedules, "tokenizer": tokenizer,
            "flops_budget": budget, "mean_tokens": [n_mean, t_mean], "calibrated_schedule": sched_path}


# ----------------------------------------------------------------------------- workers
def _ours(model: str, threads: int):
    sys.path.insert(0, ROOT)  # this checkout's runtime
    import numpy as np

    from adatoken_compile.runtime import load
    from adatoken_compile.runtime.image import load_image

    rt = load(model, "cpu", threads=threads)
    images = {}

    def run(images_: list[str], question: str, new_tokens: int, ratio=None, relevance_weight=None, presize=None) -> dict:
        arrs = [images.setdefault(p, load_image(p)) for p in images_]  # decoded before the clock, as for OpenVINO
        t0 = time.perf_counter()
        feeds = rt.prepare([(arrs[0] if len(arrs) == 1 else arrs, question)])
        t1 = time.perf_counter()
        gen = rt.generate_ids(feeds, max_new_tokens=new_tokens)
        toks = [int(next(gen)[0])]
        ttft = time.perf_counter() - t0
        toks += [int(t[0]) for t in gen]
        out = rt._last
        n_in = int(feeds["attention_mask"].sum())
        n_vis = int((feeds["spatial_mask"] & feeds["attention_mask"].astype(bool)).sum())
        per_layer = [int(np.asarray(out[f"mask.{i}"], bool).sum()) - (n_in - n_vis) for i in range(rt.num_layers)]
        return {"tokens": strip_eos(toks, rt.eos_id), "ttft_s": ttft, "embed_s": t1 - t0, "n_input": n_in,
                "n_visual": n_vis, "spatial_per_layer": per_layer}

    return run, {"precision": rt.precision, "providers": rt.providers,
                 "cuts": [[c.layer, c.keep, c.rule.label()] for c in rt.schedule.cuts]}


def _openvino(model: str, threads: int, f32: bool):
    import numpy as np
    import openvino as ov
    import openvino_genai as ovg
    from PIL import Image

    sched, props, info = bp.openvino_setup(threads, f32)
    pipe = ovg.VLMPipeline(model, "CPU", scheduler_config=sched, **props)
    base = pipe.get_generation_config()
    eos = sorted(set(base.stop_token_ids) | {base.eos_token_id})
    info.update(relevance_weight_default=base.relevance_weight, eos=eos)
    images = {}

    def tensor(p: str, size=None):
        """The image as OpenVINO takes it; ``size`` [width, height, Pillow filter]: resized first."""
        key = (p, tuple(size) if size else None)
        if key not in images:
            arr = np.load(p) if p.endswith(".npy") else np.asarray(Image.open(p).convert("RGB"))
            if size:
                arr = np.asarray(Image.fromarray(arr).resize((size[0], size[1]), resample=size[2]))
            images[key] = ov.Tensor(np.ascontiguousarray(arr)[None])
        return images[key]

    class Tokens(ovg.StreamerBase):
        def __init__(self):
            super().__init__()
            self.ids = []

        def write(self, token):
            self.ids.extend(token if isinstance(token, list) else [token])
            return ovg.StreamingStatus.RUNNING

        def end(self):
            pass

    def run(images_: list[str], question: str, new_tokens: int, ratio: int = 0, relevance_weight=None,
            presize=None) -> dict:
        ts = [tensor(p, presize[i] if presize else None) for i, p in enumerate(images_)]
        gc = pipe.get_generation_config()
        gc.max_new_tokens, gc.do_sample, gc.pruning_ratio = new_tokens, False, ratio
        if relevance_weight is not None:
            gc.relevance_weight = relevance_weight
        st = Tokens()
        res = pipe.generate(question, images=ts, generation_config=gc, streamer=st)
        pm = res.perf_metrics
        return {"tokens": strip_eos([int(t) for t in st.ids], eos), "ttft_s": pm.get_ttft().mean / 1000,
                "embed_s": pm.get_prepare_embeddings_duration().mean / 1000, "n_input": int(pm.get_num_input_tokens()),
                "text": res.texts[0]}

    return run, info


def worker_command(engine: str, model: str, threads: int, cache: str) -> list[str]:
    python = sys.executable if engine.startswith("ours") else os.path.join(cache, "venvs", PEER, "bin", "python")
    return [python, os.path.abspath(__file__), "--worker", engine, "--artifact", model, "--threads", str(threads)]


# ----------------------------------------------------------------------------- driver
def measure(args, configs: list[dict], paths: dict, questions: list[dict]) -> tuple[list[dict], dict]:
    """Every question through every configuration, ``--rounds`` times; a fresh worker per runtime
    and round, the runtimes' order rotated every round (one runtime in memory at a time)."""
    engines = list(dict.fromkeys(c["engine"] for c in configs))
    by_engine = {e: [c for c in configs if c["engine"] == e] for e in engines}
    samples, infos = [], {}
    for r in range(args.rounds):
        for e in bp.rotated(engines, r):
            w = bp.Worker(e, worker_command(e, paths[e], args.threads, args.cache), dict(os.environ))
            infos.setdefault(e, {**(w.info or {}), "load_s": []})["load_s"].append(round(w.load_s, 2))
            try:
                for c in by_engine[e]:  # first runs pay one-off allocations
                    w.request(images_=questions[0]["images"], question=questions[0]["question"], new_tokens=2,
                              ratio=c["ratio"] or 0, relevance_weight=args.relevance_weight)
                for qi, q in enumerate(questions):
                    for c in bp.rotated(by_engine[e], r + qi):
                        res = w.request(images_=q["images"], question=q["question"], new_tokens=args.new_tokens,
                                        ratio=c["ratio"] or 0, relevance_weight=args.relevance_weight,
                                        presize=q["resized"] if c.get("presize") else None)
                        res.update(config=c["name"], q=qi, round=r, load_avg_1min=round(os.getloadavg()[0], 2))
                        samples.append(res)
                bp._log(f"round {r} {e}: {len(questions)} questions, loaded in {w.load_s:.1f} s")
            finally:
                w.close()
    return samples, infos


def flops_ratios(configs: list[dict], samples: list[dict], built: dict) -> dict:
    """Prefill FLOPs over the question set / the unpruned prefill's (:mod:`adatoken_compile.flops`):
    this tool's from the spatial tokens its graphs kept at every layer (with its rules' scoring),
    OpenVINO's from the visual tokens it kept before layer 0 (its selection not counted)."""
    from adatoken_compile.flops import prefill_flops

    arch, L = built["arch"], built["arch"]["num_layers"]
    first = first_runs(samples)
    base = {q: s for (c, q), s in first.items() if c == "ours:unpruned"}
    out = {}
    for c in configs:
        num = den = 0.0
        for q, b in base.items():
            k = kept_tokens(c, q, first)
            if k is None:
                break
            n_vis, n_text = b["n_visual"], b["n_input"] - b["n_visual"]
            if c["engine"].startswith("ours"):
                rules = {x.layer: x.rule for x in built["schedules"][c["name"]].effective_cuts()}
                num += prefill_flops(arch, n_text, first[(c["name"], q)]["spatial_per_layer"], rules=rules,
                                     n_spatial0=n_vis)["total"]
            else:
                num += prefill_flops(arch, n_text, [k] * L, include_drop=False)["total"]
            den += prefill_flops(arch, n_text, [n_vis] * L)["total"]
        else:
            out[c["name"]] = num / den if den else None
    return out


def write_results(args, configs, questions, samples, infos, built) -> str:
    texts = {(s["config"], s["q"]): built["tokenizer"].decode(s["tokens"]).strip()
             for s in samples if s["round"] == 0}
    summary = summarize(samples, configs, questions, texts, flops_ratios(configs, samples, built))
    md = markdown(summary)
    loads = [s["load_avg_1min"] for s in samples]
    cal = built["schedules"]["ours:calibrated"]
    meta = {"command": shlex.join([sys.executable, *sys.argv]), "model": os.path.abspath(args.model),
            "data": os.path.abspath(args.data), "questions": len(questions), "ratios": args.ratios,
            "rounds": args.rounds, "threads": args.threads, "new_tokens": args.new_tokens,
            "relevance_weight": args.relevance_weight, "flops_of": args.flops_of,
            "flops_budget": built["flops_budget"], "mean_tokens": built["mean_tokens"],
            "calibrated": {"schedule": built["calibrated_schedule"],
                           "cuts": [[c.layer, c.keep, c.rule.label()] for c in cal.cuts],
                           "predicted": cal.predicted}, "cpus": os.cpu_count(), "load_avg_1min": [min(loads), max(loads)]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "runtimes": infos, "summary": summary,
                   "answers": {f"{c}|{q}": t for (c, q), t in texts.items()}, "samples": samples}, f, indent=1,
                  default=str)
    cuts = ", ".join(f"L{c[0]}:{c[1]:g} {c[2]}" for c in meta["calibrated"]["cuts"]) or "none"
    text = (f"`{meta['command']}`\n\n{len(questions)} questions, {args.rounds} interleaved rounds, {args.threads} "
            f"threads, answers of at most {args.new_tokens} tokens; medians over questions and rounds; calibrated "
            f"schedule at the prefill FLOPs of {args.flops_of}% pruned before the LLM (budget "
            f"{built['flops_budget']:.3f}): {cuts}; load average (1 min) {min(loads):.1f}-{max(loads):.1f} on "
            f"{os.cpu_count()} CPUs\n\n{md}")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.worker:
            if args.worker.startswith("ours"):
                bp.serve(lambda: _ours(args.artifact, args.threads))
            else:
                bp.serve(lambda: _openvino(args.artifact, args.threads, f32=args.worker == "openvino-f32"))
            return 0
        if args.convert_tokenizer:
            convert_tokenizer(args.convert_tokenizer, args.out)
            return 0
        sys.path.insert(0, ROOT)
        if args.make_questions:
            print(f"wrote {make_questions(args.make_questions, args.images, sides=args.sides)}")
            return 0
        from adatoken_compile.errors import InputError

        try:
            questions = load_questions(args.data, args.limit)
        except InputError as e:
            raise UsageError(str(e)) from None
        configs = plan(args.ratios, args.prellm_rules, args.openvino)
        built = build_all(args, configs, questions)
        samples, infos = measure(args, configs, built["paths"], questions)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_results(args, configs, questions, samples, infos, built))
    return 0


if __name__ == "__main__":
    sys.exit(main())
