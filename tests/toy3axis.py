"""A test-only decoder family with 3-axis position ids, defined here: the proof that a family whose
positions are not (B, L) needs its own module and, for the artifact runtime, a position layout in
``runtime/positions.py`` (whose numpy builder its spec uses too), and nothing else.

Positions follow M-RoPE's layout (the runtime's ``grid3``): ``position_ids (3, B, L)``; a text token has its running index on
all three axes, the n spatial tokens of a span starting at running index s sit on a grid
``w = ceil(sqrt(n))`` wide, ``(s, s + r // w, s + r % w)`` for the r-th, and the text after the span
continues at the span's largest position + 1. So a row's next position is NOT its length: decoding
continues from the prefill's largest position (what Qwen2.5-VL's ``rope_deltas`` carry). The rotary
embedding takes each third of the frequencies from one axis and returns (B, L, head_dim) tables, so
the installed Llama attention applies them unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from adatoken_compile.models.spec import DecoderSpec, register
from adatoken_compile.runtime.positions import LAYOUTS

MODEL_TYPE = "toy3axis"


class Toy3AxisConfig(LlamaConfig):
    model_type = MODEL_TYPE


class Toy3AxisRotary(nn.Module):
    """cos / sin (B, L, head_dim) from position ids (3, B, L): frequency section j reads axis j."""

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        half = dim // 2
        self.bounds = [0, half // 3, 2 * half // 3, half]

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq  # (3, B, L, dim/2)
        sel = torch.cat([freqs[j, ..., self.bounds[j]:self.bounds[j + 1]] for j in range(3)], dim=-1)
        emb = torch.cat([sel, sel], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class Toy3AxisForCausalLM(LlamaForCausalLM):
    config_class = Toy3AxisConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.rotary_emb = Toy3AxisRotary(config)


class Toy3AxisSpec(DecoderSpec):
    """The base spec with 3-axis positions: batch on axis 1, sequence on axis 2."""

    AXES = {**DecoderSpec.AXES, "position_ids": (1, 2), "decode_position_ids": (1, 2)}
    POSITION_LAYOUT = "grid3"

    def positions(self, inputs) -> torch.Tensor:
        # the runtime's numpy builder of the declared layout: one definition for the compiler and the
        # artifact runtime (tests/integration/test_toy_family.py checks it against positions by hand)
        am, sm = inputs.attention_mask.numpy(), inputs.spatial_mask.numpy()
        return torch.from_numpy(LAYOUTS[self.POSITION_LAYOUT].prefill(am, sm))

    def decode_positions(self, inputs, steps: int = 0) -> torch.Tensor:
        pos = self.positions(inputs)
        valid = inputs.attention_mask.bool()[None].expand_as(pos)
        top = torch.where(valid, pos, torch.full_like(pos, -1)).amax(dim=(0, 2))  # (B,)
        return (top + 1 + int(steps))[None, :, None].expand(3, -1, 1).contiguous()

    def example_decode_positions(self, batch: int, position: int) -> torch.Tensor:
        return torch.full((3, batch, 1), int(position), dtype=torch.int64)


SPEC = Toy3AxisSpec()
register(MODEL_TYPE, SPEC)


def toy_decoder(attn: str = "sdpa", layers: int = 4, seed: int = 0) -> Toy3AxisForCausalLM:
    torch.manual_seed(seed)
    cfg = Toy3AxisConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=101)
    model = Toy3AxisForCausalLM(cfg)
    model.config._attn_implementation = attn
    return model.eval()
