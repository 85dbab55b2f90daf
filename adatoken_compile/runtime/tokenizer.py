"""Tokenizer loading without network access, shared by adapters and the torch-free runtime.

``tokenizer.json`` (HF tokenizers) is preferred. A sentencepiece-only checkpoint
(``tokenizer.model``, as the released LLaVA-3D-7B) is converted once to the fast format through
transformers (local files only); compile then ships the ``tokenizer.json`` in the artifact.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from adatoken_compile.errors import InputError
from adatoken_compile.readers import max_data_json_bytes, read_json, regular_file

_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}


class TextTokenizer:
    def __init__(self, tok, bos_id: int | None, eos_id: int | None, pad_id: int = 0):
        self._tok = tok  # tokenizers.Tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id

    @classmethod
    def from_dir(cls, path: str) -> "TextTokenizer":
        """The tokenizer of a checkpoint directory: ``tokenizer.json`` (or a sentencepiece
        ``tokenizer.model``, converted) and ``tokenizer_config.json`` when present."""
        tj = os.path.join(path, "tokenizer.json")
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tj):
            return cls.from_files(tj, tc if os.path.exists(tc) else None)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            try:
                from transformers import AutoTokenizer  # converts sentencepiece; not in the runtime install

                hf = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
            except Exception as e:
                raise InputError(
                    f"{os.path.join(path, 'tokenizer.model')}: could not convert the sentencepiece tokenizer "
                    f"({type(e).__name__}: {e}); install sentencepiece and protobuf"
                )
            return cls._with_config(hf.backend_tokenizer, tc if os.path.exists(tc) else None)
        raise InputError(f"{path}: no tokenizer.json or tokenizer.model; the checkpoint directory must ship its tokenizer")

    @classmethod
    def from_files(cls, tokenizer_json: str, config_json: str | None = None) -> "TextTokenizer":
        """A tokenizer from exactly these files (``config_json``: special-token names, optional)."""
        if not os.path.lexists(tokenizer_json):
            raise InputError(f"{tokenizer_json}: tokenizer not found; re-create or re-download it")
        # a regular file of bounded size before the tokenizers library reads all of it
        regular_file(tokenizer_json, "tokenizer", "re-create or re-download it", max_data_json_bytes())
        try:
            tok = Tokenizer.from_file(tokenizer_json)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise InputError(f"{tokenizer_json}: unreadable tokenizer ({str(e).splitlines()[0][:200]}); "
                             "re-create or re-download it") from None
        return cls._with_config(tok, config_json)

    @classmethod
    def _with_config(cls, tok, config_json: str | None) -> "TextTokenizer":
        cfg = read_json(config_json, "tokenizer config", "fix or re-download it") if config_json else {}

        def tid(name: str):
            v = cfg.get(name, _SPECIALS[name])
            if isinstance(v, dict):
                v = v.get("content")
            if v is not None and not isinstance(v, str):
                raise InputError(f"{config_json}: '{name}' must be a token string, an object with a 'content' string, "
                                 f"or null, got {json.dumps(v)[:40]}; fix or re-download it")
            return tok.token_to_id(v) if v is not None else None

        bos, eos, pad = tid("bos_token"), tid("eos_token"), tid("pad_token")
        return cls(tok, bos, eos, pad if pad is not None else 0)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int):
        return self._tok.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def save(self, out_dir: str) -> None:
        """Write tokenizer.json + tokenizer_config.json (what the runtime reads)."""
        self._tok.save(os.path.join(out_dir, "tokenizer.json"))
        # a null entry is kept: a missing bos_token reads back as the "<s>" default
        names = {key: None if i is None else self._tok.id_to_token(i)
                 for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(names, f, indent=2)


def build_word_tokenizer(texts, extra_words=(), vocab_size: int = 512):
    """A small BPE tokenizer (Llama-like specials: <unk>=0, <s>=1, </s>=2) trained on ``texts``.

    Used for the tiny models the package generates (tests, the bundled reference model).
    Words are split on whitespace/punctuation first, then BPE-merged, so lengths resemble a real
    subword tokenizer.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # punctuation split off ("ball?" -> "ball", "?"), as subword tokenizers of real LLMs mostly do
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>", "<image>", "<boxes>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(list(texts) + list(extra_words), trainer=trainer)
    return TextTokenizer(tok, bos_id=1, eos_id=2, pad_id=0)
