"""A family with 3-axis position ids (tests/toy3axis.py, nothing of it in the package) through every
seam: the executor, the token-drop pass on its captured graph, the ONNX prefill and decode graphs,
greedy generation token-exact against its own eager reference, and a compiled artifact that the
torch-free runtime drives from the position layout it declares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adatoken_compile.compiler.capture import capture, example_args, export_prefill
from adatoken_compile.compiler.decode import export_decode
from adatoken_compile.runtime.decoding import BufferedSteps
from adatoken_compile.compiler.executor import pruned_prefill
from adatoken_compile.compiler.parity import ort_session
from adatoken_compile.compiler.reference import generate
from adatoken_compile.models.spec import spec_for
from adatoken_compile.models.spec import BASE
from adatoken_compile.passes.token_drop import apply_token_drop
from adatoken_compile.runtime.positions import LAYOUTS
from adatoken_compile.schedule import Cut, Schedule

from conftest import make_batch
from toy3axis import SPEC, toy_decoder

ROWS = [(3, 20, 4), (2, 13, 6), (4, 9, 3)]
SCHEDULE = Schedule(cuts=[Cut(1, 0.5), Cut(3, 0.25)], num_layers=4)
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def toy():
    return toy_decoder()


def test_the_family_is_found_by_its_spec_and_its_positions_matter(toy):
    batch = make_batch(ROWS)
    assert spec_for(toy) is SPEC
    pos = SPEC.positions(batch)
    assert tuple(pos.shape) == (3, *batch.attention_mask.shape)
    # decoding continues from the largest prefill position, not from the row's length
    nxt = SPEC.decode_positions(batch)[0, :, 0].tolist()
    assert nxt != batch.lengths() and all(n < length for n, length in zip(nxt, batch.lengths()))
    # the same layers run with one position per token (all three axes equal) answer differently
    with torch.no_grad():
        flat = batch.position_ids[None].expand(3, -1, -1)
        want = toy(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=pos).logits[:, -1]
        other = toy(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=flat).logits[:, -1]
    assert (want - other).abs().max() > 1e-5  # a random tiny model's logits are small: float noise is ~1e-7
    # and the executor's unpruned run is the model's own forward
    got = pruned_prefill(toy, batch, Schedule(cuts=[], num_layers=4)).logits_last
    assert torch.allclose(got, want, atol=1e-5)


def test_pruned_graph_matches_the_eager_reference(toy):
    batch = make_batch(ROWS)
    gm = apply_token_drop(capture(toy, batch), SCHEDULE)
    names = gm.meta["adatoken_layout"]["inputs"]
    with torch.no_grad():
        out = dict(zip(gm.meta["adatoken_layout"]["outputs"], gm(*example_args(batch, names, SPEC))))
    ref = pruned_prefill(toy, batch, SCHEDULE)
    assert torch.allclose(out["logits"], ref.logits_last, atol=1e-5)
    for c in range(len(SCHEDULE.cuts)):
        assert torch.equal(out[f"kept.{c}"], ref.kept_indices[c])


def test_onnx_generation_is_token_exact_against_the_eager_reference(toy, tmp_path):
    batch = make_batch(ROWS, seed=2)
    want = generate(toy, batch, SCHEDULE, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    pre = export_prefill(apply_token_drop(capture(toy, batch), SCHEDULE), batch, str(tmp_path / "prefill.onnx"))
    dec = export_decode(toy, str(tmp_path / "decode.onnx"))
    pre_s, dec_s = ort_session(pre.path), ort_session(dec.path)
    feeds = {"inputs_embeds": batch.inputs_embeds.numpy(), "attention_mask": batch.attention_mask.numpy(),
             "position_ids": SPEC.positions(batch).numpy(), "spatial_mask": batch.spatial_mask.numpy()}
    shapes = {i.name: len(i.shape) for i in pre_s.get_inputs()}
    assert shapes["position_ids"] == 3
    out = dict(zip([o.name for o in pre_s.get_outputs()], pre_s.run(None, feeds)))
    # the runtime's own decode loop: per-layer buffers bound in place, 3-axis positions passed through
    steps = BufferedSteps(dec_s, out, 4, NEW_TOKENS)
    assert len(set(steps.capacities)) > 1  # layers behind a cut hold fewer slots
    logits = out["logits"]
    embed = toy.get_input_embeddings()
    got = [[] for _ in ROWS]
    for t in range(NEW_TOKENS):
        tok = logits.argmax(-1)
        for b, x in enumerate(tok.tolist()):
            got[b].append(int(x))
        if t == NEW_TOKENS - 1:
            break
        with torch.no_grad():
            x = embed(torch.from_numpy(tok.astype(np.int64))[:, None]).numpy()
        logits = steps.step(x, SPEC.decode_positions(batch, t).numpy())
    assert steps.kv_bytes == 0
    assert got == want


def test_grid3_positions_by_hand():
    """One left-padded row: 2 text tokens, a span of 5 spatial tokens on a 3-wide grid, 2 text tokens."""
    am = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int64)
    sm = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0]], bool)
    layout = LAYOUTS["grid3"]
    want = np.array([[1, 1, 0, 1, 2, 2, 2, 2, 2, 5, 6],
                     [1, 1, 0, 1, 2, 2, 2, 3, 3, 5, 6],
                     [1, 1, 0, 1, 2, 3, 4, 2, 3, 5, 6]])[:, None, :]
    assert np.array_equal(layout.prefill(am, sm), want)
    assert layout.start(am, sm).tolist() == [7]  # not the row's length, 9
    assert np.array_equal(layout.decode(layout.start(am, sm), 2), np.full((3, 1, 1), 9))


@pytest.mark.parametrize("spec", [BASE, SPEC], ids=["sequence", "grid3"])
def test_runtime_positions_are_the_specs(spec):
    """The runtime's numpy builder of the layout a spec declares gives the spec's own positions, at
    prefill and at every decode step (rows of different lengths: left padding included)."""
    batch = make_batch(ROWS, seed=1)
    layout = LAYOUTS[spec.position_layout()["layout"]]
    am, sm = batch.attention_mask.numpy(), batch.spatial_mask.numpy()
    want = spec.positions(batch).numpy()
    got = layout.prefill(am, sm)
    assert got.dtype == np.int64 and got.ndim == layout.rank
    assert np.array_equal(got, want)
    start = layout.start(am, sm)
    for t in range(3):
        assert np.array_equal(layout.decode(start, t), spec.decode_positions(batch, t).numpy())


def _toy_adapter(tiny3d_dir):
    """The tiny LLaVA-3D adapter with its decoder's weights in the toy family (3-axis positions)."""
    from adatoken_compile.models.registry import load_adapter
    from toy3axis import Toy3AxisConfig, Toy3AxisForCausalLM

    adapter = load_adapter(tiny3d_dir)
    cfg = Toy3AxisConfig(**{k: v for k, v in adapter.decoder.config.to_dict().items() if k != "model_type"})
    toy = Toy3AxisForCausalLM(cfg)
    toy.load_state_dict(adapter.decoder.state_dict())
    toy.config._attn_implementation = adapter.decoder.config._attn_implementation
    adapter.decoder = toy.eval()
    adapter.spec = spec_for(toy)
    return adapter


def test_toy_artifact_runs_through_the_runtime(tiny3d_dir, tmp_path):
    """compile writes the spec's layout; the runtime prefills and decodes with it, token-exact
    against the eager pruned reference of the same decoder."""
    import json

    from adatoken_compile.compiler.pipeline import compile_artifact
    from adatoken_compile.contract import Sample
    from adatoken_compile.runtime import load
    from conftest import simple_scene

    adapter = _toy_adapter(tiny3d_dir)
    assert adapter.spec is SPEC
    sched = Schedule(cuts=list(SCHEDULE.cuts), num_layers=4, fingerprint=adapter.fingerprint(), family=adapter.family)
    out = str(tmp_path / "toy")
    compile_artifact(adapter, sched, out, progress=False)
    with open(f"{out}/preprocess.json") as f:
        assert json.load(f)["positions"] == {"layout": "grid3"}
    rt = load(out)
    assert rt.positions.name == "grid3"
    scenes = [simple_scene(seed=0), simple_scene(seed=1)]
    questions = ["what is here?", "how many chairs are next to the table?"]
    feeds = rt.prepare(list(zip(scenes, questions)))
    batch = adapter.prepare([Sample(question=q, scene=s) for s, q in zip(scenes, questions)])
    assert np.array_equal(feeds["position_ids"], SPEC.positions(batch).numpy())
    want = generate(adapter.decoder, batch, sched, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    got = np.stack(list(rt.generate_ids(feeds, NEW_TOKENS, ignore_eos=True)), axis=1).tolist()
    assert got == want


def test_an_artifact_without_a_layout_is_sequence_and_an_unknown_one_is_refused():
    from adatoken_compile.errors import InputError
    from adatoken_compile.runtime.positions import layout_of

    assert layout_of(None, "art/preprocess.json", "recompile").name == "sequence"
    with pytest.raises(InputError, match=r"^art/preprocess.json: 'positions' must be .*'spiral'.*; recompile$"):
        layout_of({"layout": "spiral"}, "art/preprocess.json", "recompile")
