"""The text side of stage 2: the bundled model's tokenizer, a question's token ids in the llava_v1
prompt, and the key words (class, plural, colour) that the read-outs and dense targets hang on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_PLACEHOLDER = -200  # the scene's place in the prompt's token ids (upstream IMAGE_TOKEN_INDEX)


def training_tokenizer():
    """The bundled model's tokenizer: trained on the system prompt and every question and answer
    the generator can emit, inside the real llava_v1 prompt pieces ("\n" included)."""
    from adatoken_compile.benchmark3d import dataset as ds
    from adatoken_compile.runtime.prompt import SYSTEM_PROMPT, llava_v1_prompt
    from adatoken_compile.runtime.tokenizer import build_word_tokenizer

    texts = [SYSTEM_PROMPT, "USER: ASSISTANT:"] + list(ds.all_texts())
    texts += [llava_v1_prompt(t) for t in ds.all_texts()]
    return build_word_tokenizer(texts, vocab_size=600)


def key_word_ids(tok) -> set[int]:
    """Last token of every class / plural / colour word: the words a question's answer hinges on."""
    from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES, PLURALS

    return {tok.encode(" " + w)[-1] for w in (*CLASSES, *PLURALS.values(), *COLOR_NAMES)}


def key_word_position(suffix_ids: list[int], key_ids: set[int]) -> int:
    """Index of the last class / colour word in a question's token ids (2 if none): before it the
    question text does not yet say what is asked ("which is closer to the red object, the blue
    one" has one candidate of two), so an answer target there can only be met by a guess from the
    scene alone."""
    hits = [i for i, t in enumerate(suffix_ids) if t in key_ids]
    return hits[-1] if hits else 2


def word_of_key_token(tok) -> dict[int, tuple[str, str]]:
    """Token id -> ("class", name) / ("colour", name) for the last token of every singular class
    word and colour word (plurals name several objects and are left out)."""
    from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES

    out = {tok.encode(" " + c)[-1]: ("class", c) for c in CLASSES}
    out.update({tok.encode(" " + c)[-1]: ("colour", c) for c in COLOR_NAMES})
    return out


def prompt_ids(tok, question: str) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the token ids of ``question``'s llava_v1 prompt before the scene (BOS,
    system prompt, "USER: ") and after it ("\n{question} ASSISTANT:")."""
    from adatoken_compile.runtime.prompt import llava_v1_prompt, tokenize_with_placeholders

    ids = tokenize_with_placeholders(tok, llava_v1_prompt(question))
    k = ids.index(IMAGE_PLACEHOLDER)
    return ids[:k], ids[k + 1 :]


@dataclass
class Vocabulary:
    """The tokenizer and the token tables stage 2 reads its targets with."""

    tok: object
    prefix_ids: list[int]  # every prompt's ids before the scene
    class_word: torch.Tensor  # first token of each class word, in CLASSES order
    colour_word: torch.Tensor  # first token of each colour word, in COLOR_NAMES order
    key_ids: set[int]
    word_of: dict[int, tuple[str, str]]

    @classmethod
    def of(cls, tok) -> Vocabulary:
        from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES

        return cls(tok, prompt_ids(tok, "")[0], torch.tensor([tok.encode(" " + c)[0] for c in CLASSES]),
                   torch.tensor([tok.encode(" " + c)[0] for c in COLOR_NAMES]), key_word_ids(tok), word_of_key_token(tok))
