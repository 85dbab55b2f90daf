"""Torch-free prompt and image-input pieces shared by the adapters and the ONNX runtime.

The adapters (:mod:`adatoken_compile.models.llava3d`, :mod:`adatoken_compile.models.llava_hf`)
import these definitions, and :mod:`adatoken_compile.runtime.engine` builds exactly the same token
sequence from them without importing torch.
"""

from __future__ import annotations

import numpy as np

from adatoken_compile.errors import InputError
from adatoken_compile.runtime.scene import resize_crop_params

IMAGE_TOKEN_INDEX = -200
BOXES_TOKEN_INDEX = -300
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def llava_v1_prompt(question: str) -> str:
    """The upstream ``llava_v1`` template with the image placeholder before the question."""
    return f"{SYSTEM_PROMPT} USER: <image>\n{question} ASSISTANT:"


def llava_hf_prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


PROMPTS = {"llava_v1": llava_v1_prompt, "llava_hf": llava_hf_prompt}


def tokenize_with_placeholders(tokenizer, prompt: str) -> list[int]:
    """Upstream ``tokenizer_image_token``: chunks around ``<image>``/``<boxes>`` tokenized apart,
    BOS once at the start, placeholders as -200 / -300."""
    ids: list[int] = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for i, img_chunk in enumerate(prompt.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        for j, chunk in enumerate(img_chunk.split("<boxes>")):
            if j:
                ids.append(BOXES_TOKEN_INDEX)
            if chunk:
                ids.extend(tokenizer.encode(chunk))
    return ids


def preprocess_image(image: np.ndarray, size: int, mean, std) -> np.ndarray:
    """(H,W,3) uint8 -> (3,size,size) float32: shortest side to size (bicubic), centre crop, normalise."""
    from PIL import Image

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise InputError(f"image has shape {img.shape} dtype {img.dtype}, expected (H,W,3) uint8 RGB")
    H, W = img.shape[:2]
    nh, nw, top, left = resize_crop_params(H, W, size)
    if (nh, nw) != (H, W):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    img = img[top : top + size, left : left + size].astype(np.float32) / 255.0
    m = np.asarray(mean, np.float32).reshape(1, 1, 3)
    s = np.asarray(std, np.float32).reshape(1, 1, 3)
    return ((img - m) / s).transpose(2, 0, 1).copy()
