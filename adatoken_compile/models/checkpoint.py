"""Checkpoint directory reading: config, safetensors (sharded or single), fingerprints, and the
checkpoint's own conventions (its chat template, its image processor's settings).

Weights load from safetensors only. A pickle-format checkpoint (``*.bin`` / ``*.pt``) is refused:
unpickling runs arbitrary code. Convert it once with a trusted tool to safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
from transformers.utils.chat_template_utils import render_jinja_template

from adatoken_compile.errors import InputError
from adatoken_compile.readers import MAX_JSON_BYTES, Fields, read_bytes, read_json, regular_file
from adatoken_compile.runtime.image import ImageProcessing
from adatoken_compile.runtime.prompt import QUESTION_FIELD, PromptFormat

FIX_CONFIG = "fix or re-download the checkpoint's config"
# transformers' PIL-backend processors (the semantics LLaVA and LLaVA-3D were trained with; the
# torchvision backend resamples with different arithmetic)
IMAGE_PROCESSORS = {"CLIPImageProcessor": CLIPImageProcessorPil, "SiglipImageProcessor": SiglipImageProcessorPil}


def read_config(model_dir: str, name: str = "config.json") -> dict:
    """A checkpoint's JSON config (``name``) as an object, with one-line errors."""
    path = os.path.join(model_dir, name)
    if not os.path.isdir(model_dir):
        raise InputError(f"{model_dir}: model directory not found; pass --model DIR (a checkpoint directory) or a bundled name")
    if not os.path.exists(path):
        raise InputError(f"{path}: missing; a checkpoint directory needs {name} next to its safetensors")
    return read_json(path, "config", FIX_CONFIG)


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint (index order), or a clear error."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        fix = "it needs a 'weight_map' of tensor names to shard file names; re-download it"
        wm = Fields(read_json(index, "safetensors index", fix), index, fix).obj("weight_map").data
        if not wm or not all(isinstance(v, str) and v for v in wm.values()):
            raise InputError(f"{index}: 'weight_map' must map tensor names to shard file names; {fix}")
        files = sorted(set(wm.values()))
        for fn in files:
            p = os.path.join(model_dir, fn)
            if os.path.basename(fn) != fn or fn in (".", "..") or not os.path.isfile(p):
                raise InputError(f"{index}: shard '{fn}' listed in weight_map is missing from {model_dir}")
        return [os.path.join(model_dir, fn) for fn in files]
    if os.path.exists(single):
        return [single]
    pickled = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickled:
        raise InputError(
            f"{os.path.join(model_dir, pickled[0])}: pickle-format weights are refused (unpickling runs code); "
            "convert the checkpoint to safetensors first"
        )
    raise InputError(f"{model_dir}: no model.safetensors or model.safetensors.index.json found")


class LazyWeights:
    """Parameters of a model whose values stay on disk: each placeholder tensor (by its storage
    address, which survives torch.export's re-wrapping of parameters) -> a function reading the
    real value."""

    def __init__(self):
        self._by_ptr: dict[int, Callable[[], torch.Tensor]] = {}

    def add(self, tensor: torch.Tensor, load: Callable[[], torch.Tensor]) -> None:
        if tensor.numel():
            self._by_ptr[tensor.data_ptr()] = load

    def __len__(self) -> int:
        return len(self._by_ptr)

    def for_module(self, module: torch.nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
        """``{parameter / buffer name in module: loader}`` (the names the exporter gives initializers)."""
        named = dict(module.named_parameters(remove_duplicate=False))
        named.update(module.named_buffers(remove_duplicate=False))
        return {name: self._by_ptr[t.data_ptr()] for name, t in named.items()
                if t.numel() and t.data_ptr() in self._by_ptr}


class OnDisk:
    """A checkpoint tensor not read yet: file, name, shape and dtype from the safetensors header.
    ``load()`` reads that one tensor."""

    def __init__(self, path: str, key: str, shape, dtype: str):
        self.path, self.key, self.shape, self.dtype = path, key, tuple(int(d) for d in shape), dtype

    def load(self) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            t = f.get_tensor(self.key)
        check_finite(t, self.path, self.key)
        return t


def load_state_dict(files: Iterable[str], on_disk=None) -> dict:
    """Every tensor of the safetensors ``files``; those whose name satisfies ``on_disk(name)`` are
    left on disk as :class:`OnDisk` (only the header is read). A tensor holding NaN or inf is
    refused when it is read (it would answer garbage, silently)."""
    sd: dict = {}
    for path in files:
        regular_file(path, "safetensors file", "re-download it")  # not a device or FIFO mapped into memory
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    if k in sd:
                        raise InputError(f"{path}: tensor '{k}' appears in more than one shard")
                    if on_disk is not None and on_disk(k):
                        sl = f.get_slice(k)
                        sd[k] = OnDisk(path, k, sl.get_shape(), sl.get_dtype())
                    else:
                        sd[k] = f.get_tensor(k)
                        check_finite(sd[k], path, k)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e}); re-download it")
    return sd


def check_finite(t: torch.Tensor, where: str, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputError(f"{where}: tensor '{name}' holds NaN or inf values; the checkpoint is corrupt or was saved "
                         "after a diverged training step, re-download or re-export it")


def check_weight_bytes(n_params: int, files: Iterable[str], where: str) -> None:
    """Refuse a config that implies far more weights than its safetensors hold, before a module of
    that size is built (a typo'd hidden_size would otherwise exhaust memory, not fail cleanly).
    Weights are counted at 2 bytes, the smallest dtype a checkpoint of this tool's families ships."""
    on_disk = sum(os.path.getsize(p) for p in files)
    if 2 * n_params > on_disk + (1 << 20):
        raise InputError(f"{where}: the config implies at least {n_params:,} weights ({2 * n_params / 1e9:.2f} GB at "
                         f"16 bits), but the safetensors hold {on_disk / 1e9:.2f} GB; the config does not describe these "
                         f"weights, {FIX_CONFIG}")


def files_digest(paths: Iterable[str], extra: bytes = b"") -> str:
    """sha256 over file names (basename) and bytes, in the given order."""
    h = hashlib.sha256(extra)
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def config_digest(cfg: dict) -> bytes:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()


def assign_exact(module: torch.nn.Module, sd: dict, where: str, prefix: str = "", lazy=None) -> None:
    """Load ``sd`` into ``module``; a missing or unexpected key is an error naming the key.
    :class:`OnDisk` entries are not read: the module keeps its placeholder tensor and ``lazy``
    (:class:`LazyWeights`) records where the value is."""
    own = module.state_dict(keep_vars=True)
    expected = {k for k in own}
    given = set(sd)
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if missing:
        raise InputError(f"{where}: checkpoint lacks tensor '{prefix}{missing[0]}' ({len(missing)} missing); wrong checkpoint layout?")
    if unexpected:
        raise InputError(f"{where}: unexpected tensor '{prefix}{unexpected[0]}' ({len(unexpected)} unexpected); wrong checkpoint layout?")
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise InputError(
                f"{where}: tensor '{prefix}{k}' has shape {tuple(v.shape)}, the config implies {tuple(own[k].shape)}"
            )
        # an integer or boolean tensor where the module holds floats would be cast silently and
        # answer nothing; only floating weights load into floating parameters
        dt = v.dtype if isinstance(v, torch.Tensor) else str(v.dtype)
        floating = dt.is_floating_point if isinstance(dt, torch.dtype) else dt.upper().startswith(("F", "BF"))
        if own[k].is_floating_point() and not floating:
            raise InputError(f"{where}: tensor '{prefix}{k}' is stored as {dt}, not a floating type; the weights "
                             "are not a float checkpoint (re-export them as float16/bfloat16/float32)")
    later = {k: v for k, v in sd.items() if isinstance(v, OnDisk)}
    if later and lazy is None:
        raise ValueError("assign_exact: tensors left on disk need a LazyWeights to record them")
    for k, v in later.items():
        lazy.add(own[k], v.load)
    module.load_state_dict({k: v for k, v in sd.items() if k not in later}, strict=not later)


def embed_token_ids(decoder, ids) -> torch.Tensor:
    """(n, H) input embeddings of token ids through the decoder's own embedding table."""
    emb = decoder.get_input_embeddings()
    with torch.no_grad():  # next to the encoder's features, on the CPU, wherever the decoder runs
        return emb(torch.tensor(list(ids), dtype=torch.long, device=emb.weight.device)).cpu()


def image_processing(proc_dir: str, image_size: int) -> ImageProcessing:
    """The settings of ``proc_dir/preprocessor_config.json`` (CLIP's at ``image_size`` when there is
    none), resolved by transformers' own processor class, defaults included."""
    path = os.path.join(proc_dir, "preprocessor_config.json")
    if not os.path.exists(path):
        return ImageProcessing.clip(image_size)
    cfg = read_json(path, "preprocessor config", "fix or re-download the checkpoint's preprocessor config")
    kind = str(cfg.get("image_processor_type") or "CLIPImageProcessor")
    cls = IMAGE_PROCESSORS.get(kind.removesuffix("Fast").removesuffix("Pil"))
    if cls is None:
        raise InputError(f"{path}: image_processor_type '{kind}' unsupported; the runtime reproduces "
                         f"{' and '.join(IMAGE_PROCESSORS)} (with or without Fast)")
    try:
        p = cls(**{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")})
    except Exception as e:
        raise InputError(f"{path}: transformers cannot build its image processor ({type(e).__name__}: {e})")
    size = p.size if p.do_resize else None
    if size is not None and not (size.shortest_edge and not size.longest_edge) and not (size.height and size.width):
        raise InputError(f"{path}: resize size {dict(cfg.get('size') or {})} unsupported; use shortest_edge or "
                         "height/width")
    try:  # a value of the wrong type ('', a list) fails the conversions: the file's fault, one line
        proc = ImageProcessing(
            shortest_edge=int(size.shortest_edge) if size is not None and size.shortest_edge else None,
            resize_hw=(int(size.height), int(size.width)) if size is not None and size.height else None,
            resample=int(p.resample),
            crop_hw=(int(p.crop_size.height), int(p.crop_size.width)) if p.do_center_crop and p.crop_size else None,
            rescale=float(p.rescale_factor) if p.do_rescale else None,
            mean=tuple(float(x) for x in p.image_mean) if p.do_normalize else None,
            std=tuple(float(x) for x in p.image_std) if p.do_normalize else None)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as e:
        raise InputError(f"{path}: a resize, crop or normalisation value is malformed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''}); fix or re-download the checkpoint's "
                         "preprocessor config") from None
    if proc.output_hw(image_size, image_size + 1) != (image_size, image_size):
        raise InputError(f"{path}: makes {proc.output_hw(image_size, image_size + 1)} pixel values from a "
                         f"{image_size}x{image_size + 1} image; the vision tower takes {image_size}x{image_size}")
    return proc


def chat_template(model_dir: str) -> tuple[str, str] | None:
    """The checkpoint's chat template and the file it came from: the processor's
    (``chat_template.jinja`` / ``chat_template.json``), else the tokenizer's
    (``tokenizer_config.json``); None when it ships none."""
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        raw = read_bytes(jinja, "chat template", "fix or re-download it", MAX_JSON_BYTES)
        try:
            return raw.decode("utf-8"), jinja
        except UnicodeDecodeError:
            raise InputError(f"{jinja}: not UTF-8 text; fix or re-download it") from None
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            continue
        t = read_json(path, "config", "fix or re-download it").get("chat_template")
        if isinstance(t, list):  # named templates: the default one
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        if isinstance(t, str) and t.strip():
            return t, path
    return None


def chat_prompt(model_dir: str, tokenizer, image_token: str = "<image>") -> PromptFormat | None:
    """The prompt the checkpoint's chat template makes for one user turn holding the image and
    the question, with the generation prompt, rendered by transformers; None without a template.

    The image goes first, as an image content part (HF LLaVA templates) or as ``<image>`` and a newline
    before the question text (LLaVA's convention, for text-only templates). A leading BOS text is dropped:
    the tokenization adds BOS once."""
    found = chat_template(model_dir)
    if found is None:
        return None
    template, where = found
    special = {k: tokenizer.id_to_token(i) for k, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                                                   ("pad_token", tokenizer.pad_id)) if i is not None}
    tried = []
    for content in ([{"type": "image"}, {"type": "text", "text": QUESTION_FIELD}], f"<image>\n{QUESTION_FIELD}"):
        try:
            text = render_jinja_template([[{"role": "user", "content": content}]], chat_template=template,
                                         add_generation_prompt=True, **special)[0][0]
        except Exception as e:  # a template that rejects this message form: try the next
            tried.append(f"{type(e).__name__}: {e}")
            continue
        if image_token != "<image>":
            text = text.replace(image_token, "<image>")
        if text.count("<image>") == 1 and text.count(QUESTION_FIELD) == 1:
            bos = special.get("bos_token")
            if bos and text.startswith(bos):
                text = text[len(bos):]
            return PromptFormat("chat_template", text)
        tried.append(f"rendered {text[:80]!r}")
    raise InputError(f"{where}: the chat template does not place one image and the question in a user turn "
                     f"({'; '.join(tried)}); fix it, or remove 'chat_template' to use the built-in prompt")


def load_composite(model_dir: str, cls, model_type: str, what: str, attn_implementation: str, dtype: torch.dtype):
    """(config dict, weight files, model) of a transformers vision-language checkpoint whose decoder
    sits in ``text_config``: the model type and the decoder's size against the weights checked
    before ``cls.from_pretrained`` builds it, every loaded weight finite. ``what`` names the
    checkpoint kind in errors."""
    from adatoken_compile.arch import check_config, parameter_count
    from adatoken_compile.readers import Fields

    cfg = read_config(model_dir)
    where = os.path.join(model_dir, "config.json")
    if cfg.get("model_type") != model_type:
        raise InputError(f"{where}: model_type '{cfg.get('model_type')}' is not {what} checkpoint ('{model_type}')")
    files = weight_files(model_dir)  # refuses pickle checkpoints before transformers sees them
    text = Fields(cfg, where, FIX_CONFIG).obj("text_config", default={})
    # the decoder's size against the weights', before it is built (fields left to transformers' defaults: not checked)
    if all(k in text.data for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                                     "vocab_size")):
        check_weight_bytes(parameter_count(check_config(text.data, f"{where}: text_config", FIX_CONFIG)), files, where)
    try:
        model = cls.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                    attn_implementation=attn_implementation, dtype=dtype)
    except Exception as e:
        kind = what.split(" ", 1)[-1].removeprefix("HF ")
        raise InputError(f"{model_dir}: could not load the {kind} checkpoint ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}); {FIX_CONFIG}") from None
    for name, t in model.state_dict().items():
        check_finite(t, model_dir, name)
    return cfg, files, model.eval()
