"""Attention observers: mine text -> spatial attention layer by layer, reducing on the fly.

No attention weights are read from the attention kernel (SDPA and eager both work). The observer
is a per-layer callback on the prefill executor (:class:`adatoken_compile.compiler.executor.PrefillExecutor`,
unpruned): after each layer it receives the attention's input, the rotary tables and the post-RoPE
keys and values exactly as the kernel saw them, recomputes the query rows it needs through the
family's spec (:meth:`adatoken_compile.models.spec.DecoderSpec.query_rows` at those rows'
positions), forms their softmax rows against the row's real causal keys, reduces them into
:class:`CalibrationStats` and drops them; the executor keeps no layer's cache.

Memory: per layer only ``(heads, m, n)`` for the ``m`` observed query rows of one batch row (text
rows, never all ``n`` rows), plus one ``(layers, N_spatial)`` head-mean vector per row for the
retained-mass tables. Nothing is kept across layers or samples beyond these reductions.

Query groups per batch row (prompt = the original sequence; answers are appended after it with
teacher forcing when given): ``instr`` = non-spatial prompt tokens after the last spatial token,
``last`` = the last prompt token (the run-time scoring query), ``answer`` = the appended answer
tokens. Rows without spatial tokens are skipped (counted in ``skipped_rows``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from adatoken_compile.compiler.executor import LayerEvent, PrefillExecutor
from adatoken_compile.contract import DecoderInputs, Segment, collate
from adatoken_compile.errors import InputError
from adatoken_compile.models.spec import spec_for
from adatoken_compile.schedule import Schedule
from adatoken_compile.calibration.stats import GROUPS, CalibrationStats, to_fixed


def softmax_rows(attn: torch.nn.Module, q: torch.Tensor, keys: torch.Tensor, q_local: torch.Tensor) -> torch.Tensor:
    """Causal softmax rows (heads, m, n) of queries (heads, m, d) against keys (kv_heads, n, d).

    ``q_local`` (m,) are the queries' indices in the key axis (query i sees keys <= q_local[i]).
    Scaled by the module's ``scaling`` (1/sqrt(d)), softmax in float32 like the eager kernel.
    """
    heads, m, d = q.shape
    kvh, n, _ = keys.shape
    g = heads // kvh
    s = torch.matmul(q.view(kvh, g, m, d), keys.float().transpose(-1, -2).unsqueeze(1)).reshape(heads, m, n)
    s = s * float(getattr(attn, "scaling", d**-0.5))
    causal = torch.arange(n, device=s.device)[None, :] > q_local.to(s.device)[:, None]
    s = s.masked_fill(causal[None], float("-inf"))
    return torch.softmax(s, dim=-1)


def _bin(rel: torch.Tensor, nb: int) -> torch.Tensor:
    return (rel * nb).floor().clamp_(0, nb - 1).long()


# ---------------------------------------------------------------------- answers
def _answer_embeds(decoder, ans) -> torch.Tensor | None:
    if ans is None:
        return None
    if not torch.is_tensor(ans):
        ans = torch.as_tensor(ans)
    if ans.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if ans.ndim != 1:
            raise InputError(f"answers: token ids must be 1-D, got shape {tuple(ans.shape)}")
        if ans.numel() == 0:
            return None
        emb = decoder.get_input_embeddings()
        return emb(ans.long().to(emb.weight.device)).cpu()  # appended to the prompt's row on the CPU
    if ans.ndim != 2:
        raise InputError(f"answers: embeddings must be (A, H), got shape {tuple(ans.shape)}")
    return ans if ans.shape[0] > 0 else None


def extend_with_answers(decoder, inputs: DecoderInputs, answers) -> tuple[DecoderInputs, list[int], list[int]]:
    """Append answer tokens (teacher forcing) after each row's prompt and re-pad on the left.

    Returns (batch, prompt_end per row, answer length per row); ``prompt_end`` is the padded
    index one past the row's last prompt token.
    """
    B, L = inputs.batch_size, inputs.seq_len
    if answers is None:
        return inputs, [L] * B, [0] * B
    if len(answers) != B:
        raise InputError(f"answers: got {len(answers)} entries for a batch of {B} rows")
    embs = [_answer_embeds(decoder, a) for a in answers]
    if all(e is None for e in embs):
        return inputs, [L] * B, [0] * B
    H = inputs.inputs_embeds.shape[-1]
    rows, alens = [], []
    for b in range(B):
        r = inputs.row(b)
        e = embs[b]
        if e is not None and e.shape[-1] != H:
            raise InputError(f"answers: row {b} has width {e.shape[-1]}, embeddings are {H} wide")
        e = e.to(r.inputs_embeds.dtype) if e is not None else r.inputs_embeds[0, :0]
        # the coordinates travel too: a family's positions may be built from them (M-RoPE)
        xyz = None if r.spatial_xyz is None else torch.cat([r.spatial_xyz[0].float(), torch.zeros(e.shape[0], 3)])
        rows.append(Segment(torch.cat([r.inputs_embeds[0], e]),
                            torch.cat([r.spatial_mask[0], torch.zeros(e.shape[0], dtype=torch.bool)]), xyz))
        alens.append(int(e.shape[0]))
    ext = collate(rows)
    T = ext.seq_len
    return ext, [T - a for a in alens], alens


# ---------------------------------------------------------------------- the observer
class AttentionObserver:
    """Accumulates :class:`CalibrationStats` over batches: ``obs.observe(batch, answers)``.

    :meth:`observe` is :meth:`plan` (which query rows of which batch row to read), an unpruned
    prefill with :meth:`on_layer` as its per-layer callback, then :meth:`finish` (the retained-mass
    tables, which need every layer); a driver that runs the layers itself calls the three.
    """

    def __init__(self, decoder, stats: CalibrationStats):
        self.decoder = decoder
        self.stats = stats
        self.spec = spec_for(decoder)
        self.layers = self.spec.layers(decoder)
        self._gram: dict[int, torch.Tensor] = {}
        L = len(self.layers)
        if stats.arch["num_layers"] != L:
            raise InputError(f"observer: stats are for {stats.arch['num_layers']} layers, the decoder has {L}")

    # per layer and head: G_h = W_o,h^T W_o,h so that ||W_o,h v||^2 = v^T G_h v
    def _gram_for(self, i: int, attn) -> torch.Tensor:
        g = self._gram.get(i)
        if g is None:
            W = attn.o_proj.weight.detach().float()  # (H, heads*d)
            d = attn.head_dim
            Wh = W.view(W.shape[0], -1, d)  # (H, heads, d)
            g = torch.einsum("khd,khe->hde", Wh, Wh)
            self._gram[i] = g
        return g

    @torch.no_grad()
    def observe(self, inputs: DecoderInputs, answers=None) -> None:
        ext, plan = self.plan(inputs, answers)
        PrefillExecutor(self.decoder, ext, materialize_mask=False, spec=self.spec, keep_kv=False).run(
            on_layer=lambda ev: self.on_layer(plan, ev))
        self.finish(plan)

    def plan(self, inputs: DecoderInputs, answers=None) -> tuple[DecoderInputs, list]:
        """The batch with answers appended, and per row None (no spatial tokens: skipped) or the
        positions to observe; counts the rows' tokens into the statistics."""
        ext, prompt_end, alens = extend_with_answers(self.decoder, inputs, answers)
        B, T = ext.batch_size, ext.seq_len
        lengths = ext.lengths()
        sm = ext.spatial_mask
        st = self.stats
        Lyr = len(self.layers)
        plan = []
        for b in range(B):
            off = T - lengths[b]
            sp = torch.nonzero(sm[b, off:prompt_end[b]]).flatten() + off
            n_text = (prompt_end[b] - off) - sp.numel()
            if sp.numel() == 0:
                st.add("skipped_rows", [1])
                plan.append(None)
                continue
            last = prompt_end[b] - 1
            after = torch.arange(int(sp[-1]) + 1, prompt_end[b])
            instr = after[~sm[b, after]] if after.numel() else after
            ans = torch.arange(prompt_end[b], T)
            qpos = torch.cat([instr, torch.tensor([last]), ans]).unique(sorted=True)
            idx = {int(p): i for i, p in enumerate(qpos.tolist())}
            plan.append({
                "off": off, "sp": sp - off, "qpos": qpos,
                "groups": {
                    "instr": torch.tensor([idx[int(p)] for p in instr.tolist()], dtype=torch.long),
                    "last": torch.tensor([idx[last]], dtype=torch.long),
                    "answer": torch.tensor([idx[int(p)] for p in ans.tolist()], dtype=torch.long),
                },
                "a_last": [None] * Lyr, "f_last": [None] * Lyr, "a_ans": [None] * Lyr,
            })
            st.add("samples", [1])
            st.add("spatial_tokens_sum", [sp.numel()])
            st.add("text_tokens_sum", [n_text])
            st.note_tokens(int(sp.numel()))
            if alens[b]:
                st.add("answer_samples", [1])
                st.add("answer_tokens_sum", [alens[b]])
        return ext, plan

    def on_layer(self, plan: list, ev: LayerEvent) -> None:
        """Reduce one layer's attention of the planned query rows into the statistics."""
        i, attn, h = ev.index, ev.attention, ev.attention_input
        st = self.stats
        nb = st.num_bins
        G = self._gram_for(i, attn)
        heads = G.shape[0]
        for b, pl in enumerate(plan):
            if pl is None:
                continue
            off, sp, qpos = pl["off"], pl["sp"], pl["qpos"]
            cb, sb = ev.spec.rotary_rows(ev.position_embeddings, b, qpos)
            q = ev.spec.query_rows(attn, h[b, qpos], cb, sb)
            K = ev.key[b, :, off:]
            V = ev.value[b, :, off:].float()
            p = softmax_rows(attn, q, K, qpos - off)  # (heads, m, n)
            kvh = V.shape[0]
            Vr = V.repeat_interleave(heads // kvh, dim=0)  # (heads, n, d), head h -> kv head h // g
            u = ((Vr @ G) * Vr).sum(-1).clamp_min(0).sqrt()  # (heads, n)
            f = p * u[:, None, :]
            f = f / f.sum(-1, keepdim=True).clamp_min(1e-30)
            for g in GROUPS:
                rows = pl["groups"][g]
                if rows.numel() == 0:
                    continue
                pg = p[:, rows][:, :, sp]  # (heads, m_g, N)
                fg = f[:, rows][:, :, sp]
                st.arrays[f"{g}_rows"][i] += rows.numel()
                st.add(f"{g}_attn_spatial", _row_sum_fixed(pg.sum(-1), i, st.arrays[f"{g}_attn_spatial"].shape))
                st.add(f"{g}_flow_spatial", _row_sum_fixed(fg.sum(-1), i, st.arrays[f"{g}_flow_spatial"].shape))
                rel = fg / fg.amax(-1, keepdim=True).clamp_min(1e-30)
                bins = _bin(rel, nb) + (torch.arange(heads, device=rel.device) * nb)[:, None, None]
                st.arrays[f"{g}_hist_flow"][i] += torch.bincount(bins.flatten(), minlength=heads * nb).view(heads, nb).cpu().numpy()
                fm = fg.mean(0)
                st.arrays[f"{g}_hist_flow_mean"][i] += torch.bincount(_bin(fm / fm.amax(-1, keepdim=True).clamp_min(1e-30), nb).flatten(), minlength=nb).cpu().numpy()
                pm = pg.mean(0)
                st.arrays[f"{g}_hist_attn_mean"][i] += torch.bincount(_bin(pm / pm.amax(-1, keepdim=True).clamp_min(1e-30), nb).flatten(), minlength=nb).cpu().numpy()
                if g == "last":
                    pl["a_last"][i] = pm[0].double().cpu()
                    pl["f_last"][i] = fm[0].double().cpu()
                elif g == "answer":
                    pl["a_ans"][i] = pm.mean(0).double().cpu()

    def finish(self, plan: list) -> None:
        """The retained-mass tables of every observed row (after all layers)."""
        for pl in plan:
            if pl is not None:
                self._retained(pl)

    def _retained(self, pl: dict) -> None:
        st = self.stats
        A = torch.stack(pl["a_last"])  # (Lyr, N) head-mean attention of the last token
        F = torch.stack(pl["f_last"])
        has_ans = pl["a_ans"][0] is not None
        Aa = torch.stack(pl["a_ans"]) if has_ans else None
        Lyr, N = A.shape
        ks = torch.tensor([Schedule.keep_count(r, N, N) for r in st.ratios]) - 1
        out = {"attn": np.zeros((Lyr, Lyr, len(st.ratios)), np.int64), "flow": None, "answer": None}
        out["flow"] = out["attn"].copy()
        out["answer"] = out["attn"].copy()
        for src in range(Lyr):
            order = torch.argsort(A[src], descending=True, stable=True)
            for kind, M in (("attn", A), ("flow", F), ("answer", Aa)):
                if M is None:
                    continue
                Ms = M[src:, order]
                c = Ms.cumsum(-1)
                frac = c[:, ks] / c[:, -1:].clamp_min(1e-300)  # (Lyr-src, R)
                out[kind][src, src:] = to_fixed(frac)
        st.add("retained_attn", out["attn"])
        st.add("retained_flow", out["flow"])
        st.add("retained_rows", [1])
        # the per-position prior: attention share and token share per bin of the scene order
        P = st.arrays["prior_frac"].shape[0]
        bins = (torch.arange(N) * P) // N
        share = torch.zeros(Lyr, P, dtype=torch.float64).index_add_(1, bins, A / A.sum(-1, keepdim=True).clamp_min(1e-300))
        st.add("prior_attn", to_fixed(share))
        st.add("prior_frac", to_fixed(torch.bincount(bins, minlength=P).double() / N))
        st.add("prior_rows", [1])
        if has_ans:
            st.add("retained_answer", out["answer"])
            st.add("retained_answer_rows", [1])


def _row_sum_fixed(x: torch.Tensor, layer: int, shape) -> np.ndarray:
    """x (heads, m): per-row values -> fixed-point, summed over rows, placed at ``layer``."""
    out = np.zeros(shape, np.int64)
    out[layer] = to_fixed(x).sum(axis=1)
    return out
