"""The one contract between model adapters and the compiler.

Every adapter (LLaVA-3D layout, HF LLaVA, ...) turns (scene | image, question) samples into a
:class:`DecoderInputs` batch plus the HF causal-LM decoder to run or capture. Calibration,
compilation and the runtime depend only on this contract, never on a model family.

Conventions (fixed, relied on by the graph pass and the runtime):

* **Left padding.** Row ``b`` occupies the last ``lengths[b]`` positions of the sequence axis, so
  the last position ``L-1`` is every row's last instruction token (the scoring query) and decoding
  appends at the same column for all rows.
* ``attention_mask`` is ``(B, L)`` int64, 1 for real tokens, 0 for padding.
* ``position_ids`` is ``(B, L)`` int64: ``0..lengths[b]-1`` over the real tokens, 1 on padding
  (the transformers convention), so a row's positions do not depend on the batch it sits in.
* ``spatial_mask`` is ``(B, L)`` bool, True exactly on spatial (scene / image) tokens.
* ``spatial_xyz`` is ``(B, L, 3)`` float32 or None: each spatial token's coordinates (voxel centre
  in metres for scenes, (row, col, 0) of the patch for images), 0 on other tokens. Only selection
  rules that place tokens in space read it (the prefill graph takes it when a cut's rule does);
  None reads as all zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch

from adatoken_compile.runtime.prompt import BOXES_TOKEN_INDEX, IMAGE_TOKEN_INDEX
from adatoken_compile.runtime.sample import Sample  # noqa: F401  (part of the contract)


@dataclass
class DecoderInputs:
    """One left-padded batch of spliced multimodal sequences, ready for the decoder."""

    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L) int64
    position_ids: torch.Tensor  # (B, L) int64
    spatial_mask: torch.Tensor  # (B, L) bool
    # per row: [start, end) of every spatial span, in padded coordinates
    spans: list[list[tuple[int, int]]] = field(default_factory=list)
    spatial_xyz: torch.Tensor | None = None  # (B, L, 3) float32 token coordinates

    @property
    def batch_size(self) -> int:
        return int(self.inputs_embeds.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.inputs_embeds.shape[1])

    def spatial_counts(self) -> list[int]:
        return [int(x) for x in self.spatial_mask.sum(dim=1).tolist()]

    def lengths(self) -> list[int]:
        return [int(x) for x in self.attention_mask.sum(dim=1).tolist()]

    def xyz(self) -> torch.Tensor:
        """(B, L, 3) float32 coordinates (zeros when the batch carries none)."""
        if self.spatial_xyz is None:
            return torch.zeros(self.batch_size, self.seq_len, 3)
        return self.spatial_xyz.float()

    def to_numpy(self) -> dict:
        """The prefill-graph feeds as numpy arrays (what ONNX Runtime takes; a graph reads
        ``spatial_xyz`` only when a cut's rule needs coordinates)."""
        return {
            "inputs_embeds": self.inputs_embeds.detach().cpu().numpy(),
            "attention_mask": self.attention_mask.to(torch.int64).cpu().numpy(),
            "position_ids": self.position_ids.to(torch.int64).cpu().numpy(),
            "spatial_mask": self.spatial_mask.to(torch.bool).cpu().numpy(),
            "spatial_xyz": self.xyz().cpu().numpy(),
        }

    def row(self, b: int) -> "DecoderInputs":
        """Row ``b`` alone, padding stripped."""
        n = self.lengths()[b]
        L = self.seq_len
        off = L - n
        return DecoderInputs(
            inputs_embeds=self.inputs_embeds[b : b + 1, off:],
            attention_mask=self.attention_mask[b : b + 1, off:],
            position_ids=self.position_ids[b : b + 1, off:],
            spatial_mask=self.spatial_mask[b : b + 1, off:],
            spans=[[(s - off, e - off) for s, e in self.spans[b]]] if self.spans else [],
            spatial_xyz=None if self.spatial_xyz is None else self.spatial_xyz[b : b + 1, off:],
        )

    def segment(self, b: int) -> "Segment":
        """Row ``b`` as an unpadded :class:`Segment` (to re-collate rows into other batches)."""
        r = self.row(b)
        return Segment(r.inputs_embeds[0], r.spatial_mask[0], None if r.spatial_xyz is None else r.spatial_xyz[0])


@dataclass
class Segment:
    """One row before padding: token embeddings (L, H) and which of them are spatial."""

    embeds: torch.Tensor  # (L, H)
    spatial: torch.Tensor  # (L,) bool
    xyz: torch.Tensor | None = None  # (L, 3) float32 coordinates of the spatial tokens (0 elsewhere)

    def spans(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        s = self.spatial.tolist()
        i = 0
        while i < len(s):
            if s[i]:
                j = i
                while j < len(s) and s[j]:
                    j += 1
                out.append((i, j))
                i = j
            else:
                i += 1
        return out


def collate(rows: Sequence[Segment]) -> DecoderInputs:
    """Left-pad rows into one batch following the module conventions."""
    if not rows:
        raise ValueError("collate: empty batch")
    L = max(int(r.embeds.shape[0]) for r in rows)
    H = int(rows[0].embeds.shape[1])
    dtype = rows[0].embeds.dtype
    B = len(rows)
    emb = torch.zeros(B, L, H, dtype=dtype)
    am = torch.zeros(B, L, dtype=torch.int64)
    pos = torch.ones(B, L, dtype=torch.int64)
    sm = torch.zeros(B, L, dtype=torch.bool)
    xyz = torch.zeros(B, L, 3) if any(r.xyz is not None for r in rows) else None
    spans = []
    for b, r in enumerate(rows):
        n = int(r.embeds.shape[0])
        off = L - n
        emb[b, off:] = r.embeds
        am[b, off:] = 1
        pos[b, off:] = torch.arange(n)
        sm[b, off:] = r.spatial
        if r.xyz is not None:
            xyz[b, off:] = r.xyz.float()
        spans.append([(s + off, e + off) for s, e in r.spans()])
    return DecoderInputs(emb, am, pos, sm, spans, xyz)


@dataclass
class EncoderGraph:
    """One encoder graph an adapter ships in its artifact (export configuration, optimum style)."""

    name: str  # file stem in the artifact: "encoder", "projector", ...
    module: torch.nn.Module
    example_args: tuple  # example inputs for torch.export
    dynamic_shapes: tuple  # torch.export dynamic shapes, one entry per input
    input_names: list[str]
    output_names: list[str]


@runtime_checkable
class Adapter(Protocol):
    """What every model family provides to calibration, the compiler and evaluation.

    Compile and the runtime carry no family branches: what differs between families is declared
    here (the encoder graphs to export, example samples to capture with, and the preprocessing
    the runtime repeats in numpy).
    """

    family: str  # "llava3d" | "llava-hf"
    input_kind: str  # "scene" | "image": what one sample's spatial tokens come from
    name: str | None  # how the user named the model (bundled name or directory), recorded in schedules
    decoder: torch.nn.Module  # the installed transformers *ForCausalLM, unpatched
    tokenizer: object  # adatoken_compile.runtime.tokenizer.TextTokenizer
    eos_token_id: int
    max_positions: int
    prompt: object  # adatoken_compile.runtime.prompt.PromptFormat: the checkpoint's chat template or a built-in one
    processing: object  # adatoken_compile.runtime.image.ImageProcessing: the checkpoint's image processor
    dtype: torch.dtype  # the precision the decoder and encoders were loaded in
    lazy_weights: object | None  # adatoken_compile.models.checkpoint.LazyWeights: decoder weights left on disk, or None
    spec: object  # adatoken_compile.models.spec.DecoderSpec: how the decoder runs, is captured and decodes

    def fingerprint(self) -> str:
        """Stable hash of config + weights, recorded in schedules and artifacts."""

    def describe(self) -> dict:
        """Architecture summary (the :mod:`adatoken_compile.arch` keys plus family extras)."""

    def arch(self) -> dict:
        """The decoder's normalized architecture (:func:`adatoken_compile.arch.from_config`)."""

    def spatial_tokens_xyz(self, source) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) decoder-space spatial tokens of one scene or image (:func:`spatial_source`) and
        their (N, 3) coordinates."""

    def segment(self, sample: Sample, spatial: torch.Tensor | None = None, xyz: torch.Tensor | None = None) -> Segment:
        """Encode one sample into a spliced embedding row with its spatial-token mask; ``spatial`` /
        ``xyz``: its scene's or image's tokens when already encoded (questions on one scene encode
        it once)."""

    def prepare(self, samples: Sequence[Sample]) -> DecoderInputs:
        """Encode and left-pad a batch."""

    def example_samples(self) -> list[Sample]:
        """Two small samples with different question lengths: the capture example for export."""

    def encoder_graphs(self) -> list[EncoderGraph]:
        """The encoder graph(s) compile exports next to the prefill and decode graphs."""

    def runtime_config(self) -> dict:
        """What the numpy runtime needs to rebuild the decoder inputs (``preprocess.json``)."""


def spatial_source(adapter, sample: Sample):
    """What one sample's spatial tokens come from, for this adapter: its scene or its image."""
    return sample.scene if adapter.input_kind == "scene" else sample.image


def runtime_config(adapter, input_kind: str, image_size: int, patch_size: int, **extra) -> dict:
    """The ``preprocess.json`` an adapter ships: what the numpy runtime needs to rebuild the
    decoder inputs exactly as the adapter does (the prompt format, the image processor's settings,
    special ids). ``mean`` / ``std`` repeat the processor's for readers of older artifacts."""
    proc = adapter.processing
    return {
        "family": adapter.family,
        "input": input_kind,
        "image_size": int(image_size),
        "patch_size": int(patch_size),
        "mean": [float(x) for x in (proc.mean or (0.0, 0.0, 0.0))],
        "std": [float(x) for x in (proc.std or (1.0, 1.0, 1.0))],
        "image_processing": proc.to_dict(),
        "prompt": adapter.prompt.to_dict(),
        "placeholders": {"image": IMAGE_TOKEN_INDEX, "boxes": BOXES_TOKEN_INDEX},
        "bos_id": adapter.tokenizer.bos_id,
        "eos_id": int(adapter.eos_token_id),
        "pad_id": int(adapter.tokenizer.pad_id),
        "max_positions": int(adapter.max_positions),
        "arch": adapter.arch(),
        "dtype": "float32",
        **extra,
    }
