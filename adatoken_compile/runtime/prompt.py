"""Prompt templates and placeholder tokenization, shared by the adapters and the ONNX runtime.

The adapters (:mod:`adatoken_compile.models.llava3d`, :mod:`adatoken_compile.models.llava_hf`)
import these definitions, and :mod:`adatoken_compile.runtime.engine` builds exactly the same token
sequence from them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


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
MAX_QUESTION_CHARS = 100_000  # far past any model's positions: refused before it is tokenized


def check_question(question) -> str:
    """A question every path accepts alike: a non-blank string of valid Unicode (no lone surrogates,
    as a non-UTF-8 command-line argument decodes to, no NUL)."""
    if not isinstance(question, str):
        raise InputError(f"question: expected text, got {type(question).__name__}; pass --question TEXT")
    if not question.strip():
        raise InputError("question: empty; pass a question, e.g. --question 'what color is the chair?'")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"question: {len(question)} characters, more than {MAX_QUESTION_CHARS}; shorten it")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"question: not valid text (undecodable byte at character {e.start}); pass UTF-8 text") from None
    if "\x00" in question:
        raise InputError("question: holds a NUL character; remove it")
    if "<image>" in question:
        raise InputError("question: holds '<image>', which the prompt reserves for the scene or image; remove it")
    return question


QUESTION_FIELD = "{question}"


@dataclass(frozen=True)
class PromptFormat:
    """The prompt text around a question: ``format`` with ``field`` replaced by the question, one
    ``<image>`` placeholder where the spatial tokens go. ``template`` names where it came from
    (``chat_template``: rendered from the checkpoint's own template; else a built-in name)."""

    template: str
    format: str
    field: str = QUESTION_FIELD

    @classmethod
    def builtin(cls, name: str) -> "PromptFormat":
        return cls(name, PROMPTS[name](QUESTION_FIELD))

    def text(self, question: str) -> str:
        return self.format.replace(self.field, question)

    def to_dict(self) -> dict:
        return {"template": self.template, "format": self.format, "question_field": self.field, "bos_once": True}


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
