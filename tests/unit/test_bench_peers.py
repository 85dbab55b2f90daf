"""The peer benchmark's pure parts: arguments, run order, growth, agreement, the table and the
command lines that build the peers' environments and models (nothing is installed or run)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_peers.py"


@pytest.fixture(scope="module")
def bp():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments_defaults_and_normalisation(bp):
    a = bp.parse_args(["--out", "o", "--contexts", "1460,500,500", "--precisions", "int4,fp32",
                       "--engines", "ort-genai,ours"])
    assert a.contexts == [500, 1460]
    assert a.precisions == ["fp32", "int4"]
    assert a.engines == ["ours", "ort-genai"]  # the table's order, not the command line's
    assert (a.threads, a.rounds, a.new_tokens) == (2, 3, 16)


@pytest.mark.parametrize("argv, what", [
    (["--contexts", "500,x"], "--contexts"),
    (["--contexts", "10"], "--contexts"),
    (["--contexts", "4090"], "exceeds"),
    (["--precisions", "fp16"], "--precisions"),
    (["--engines", "vllm"], "vllm"),
    (["--threads", "0"], "--threads"),
    (["--new-tokens", "1"], "--new-tokens"),
])
def test_bad_arguments_are_one_error_line_exit_2(bp, argv, what, capsys, tmp_path):
    assert bp.main(["--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and what in err[0] and " ; " in err[0]
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused_before_building(bp, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert bp.main(["--out", str(f), "--cache", str(tmp_path / "cache")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and f.read_text() == "x"


def test_interleaved_order_rotates_engines_each_round(bp):
    order = bp.interleaved_order(["a", "b", "c"], [500, 1460], rounds=3)
    assert len(order) == 3 * 2 * 3
    assert [e for r, c, e in order if (r, c) == (0, 500)] == ["a", "b", "c"]
    assert [e for r, c, e in order if (r, c) == (1, 1460)] == ["b", "c", "a"]
    assert [e for r, c, e in order if (r, c) == (2, 500)] == ["c", "a", "b"]
    # every engine runs every context once a round, rounds one after the other
    assert [r for r, _, _ in order] == sorted(r for r, _, _ in order)
    for r in range(3):
        assert sorted((c, e) for rr, c, e in order if rr == r) == sorted((c, e) for c in (500, 1460) for e in "abc")


def test_growth_is_the_least_squares_slope_per_1000_tokens(bp):
    assert bp.growth_per_1000({500: 100.0}) is None
    assert bp.growth_per_1000({500: 100.0, 1500: 185.0}) == pytest.approx(85.0)
    assert bp.growth_per_1000({500: 10.0, 1500: 30.0, 3000: 60.0}) == pytest.approx(20.0)
    assert bp.growth_per_1000({0: 0.0, 1000: 3.0, 2000: 3.0}) == pytest.approx(1.5)


def test_agreement_counts_matches_and_common_prefix(bp):
    assert bp.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {"same": 4, "of": 4, "prefix": 4}
    assert bp.agreement([1, 2, 3, 4], [1, 9, 3, 4]) == {"same": 3, "of": 4, "prefix": 1}
    assert bp.agreement([1, 2], [1, 2, 3]) == {"same": 2, "of": 2, "prefix": 2}


def test_prompt_ids_are_seeded_and_avoid_special_ids(bp):
    a = bp.prompt_ids(500, 32000)
    assert len(a) == 500 and a[0] == 1 and all(3 <= t < 32000 for t in a[1:])
    assert a == bp.prompt_ids(500, 32000)
    assert a != bp.prompt_ids(500, 32000, seed=1)


def _sample(bp, engine, ctx, prefill, decode, tokens, prec="fp32", kv=None):
    return {"precision": prec, "engine": engine, "context": ctx, "prefill_s": prefill, "decode_ms": decode,
            "tokens": tokens, "kv_bytes_per_step": kv}


def test_summary_medians_growth_agreement_and_table(bp):
    s = []
    for r, (p, d) in enumerate([(1.0, 100.0), (3.0, 120.0), (2.0, 110.0)]):
        s.append(_sample(bp, "ours", 500, p, d, [5, 6, 7], kv=4_000_000))
        s.append(_sample(bp, "ours", 1500, 2 * p, d + 50, [5, 6, 7], kv=12_000_000))
        s.append(_sample(bp, "ort-genai", 500, 0.5, 50.0, [5, 6, 8]))
        s.append(_sample(bp, "ort-genai", 1500, 1.0, 60.0, [5, 6, 7]))
    summ = bp.summarize(s)
    ours = summ["fp32"]["ours"]
    assert ours["contexts"]["500"]["prefill_s"] == 2.0 and ours["contexts"]["500"]["decode_ms"] == 110.0
    assert ours["contexts"]["500"]["runs"] == 3
    assert ours["growth_ms_per_1000"] == pytest.approx(50.0)
    assert summ["fp32"]["ort-genai"]["growth_ms_per_1000"] == pytest.approx(10.0)
    assert summ["fp32"]["ort-genai"]["contexts"]["500"]["agreement_with_ours"] == {"same": 2, "of": 3, "prefix": 2}
    rows = bp.table_rows(summ, [500, 1500])
    header = bp.table_header([500, 1500])
    assert [r[1] for r in rows] == [bp.LABELS["ours"], bp.LABELS["ort-genai"]]
    assert all(len(r) == len(header) for r in rows)
    assert rows[0][2] == "2.00 s (4.00x)" and rows[0][3] == "110.0 ms (2.20x)"
    assert rows[0][6] == "50.0 ms" and rows[0][7] == "4.0 MB / 12.0 MB"
    assert rows[1][2] == "0.50 s" and rows[1][8] == "2/3 / 3/3"
    md = bp.markdown(header, rows)
    assert md.count("\n") == 2 + len(rows) and md.splitlines()[1] == "|" + "---|" * len(header)


def test_venv_and_model_build_command_lines(bp, tmp_path):
    venv = str(tmp_path / "venvs" / "ort-genai")
    cmds = bp.venv_commands("ort-genai", venv, python="/usr/bin/python3")
    assert cmds[0] == ["/usr/bin/python3", "-m", "venv", venv]
    install = cmds[1]
    assert install[:4] == [f"{venv}/bin/python", "-m", "pip", "install"]
    # a pinned CPU torch (an unpinned one pulls CUDA builds) and a pinned peer
    assert "torch==2.13.0" in install and "onnxruntime-genai==0.18.0" in install
    assert cmds[2][3] == "uninstall" and cmds[2][-1] == "torchvision"
    ov = bp.venv_commands("openvino", "/c/venvs/openvino", python="py")
    assert "torch==2.13.0" in ov[1] and any(p.startswith("optimum-intel[openvino]") for p in ov[1])
    assert any(p.startswith("openvino-genai==") for p in ov[1])

    b = bp.build_commands("ort-genai", venv, "/w/decoder", "/w/ort-genai-int4.partial", "int4")
    assert b[:3] == [f"{venv}/bin/python", "-m", "onnxruntime_genai.models.builder"]
    assert b[b.index("-m", 3) + 1] == "/w/decoder" and b[b.index("-o") + 1] == "/w/ort-genai-int4.partial"
    assert b[b.index("-p") + 1] == "int4" and b[b.index("-e") + 1] == "cpu"
    assert b[b.index("--extra_options") + 1] == f"int4_block_size={bp.INT4_BLOCK}"
    o = bp.build_commands("openvino", "/c/venvs/openvino", "/w/decoder", "/w/openvino-fp32.partial", "fp32")
    assert o[:3] == ["/c/venvs/openvino/bin/optimum-cli", "export", "openvino"]
    assert o[o.index("--weight-format") + 1] == "fp32" and "--group-size" not in o and o[-1].endswith(".partial")
    o4 = bp.build_commands("openvino", "/c/venvs/openvino", "/w/decoder", "/w/x", "int4")
    assert o4[o4.index("--ratio") + 1] == "1.0" and o4[o4.index("--group-size") + 1] == str(bp.INT4_BLOCK)


def test_worker_commands_use_each_peers_venv(bp):
    c = bp.worker_command("ort-genai", "/m", 2, "/cache")
    assert c[0] == "/cache/venvs/ort-genai/bin/python" and c[c.index("--worker") + 1] == "ort-genai"
    assert bp.worker_command("openvino-f32", "/m", 2, "/cache")[0] == "/cache/venvs/openvino/bin/python"
    o = bp.worker_command("ours-pruned", "/m", 3, "/cache")
    assert o[0] != "/cache/venvs/openvino/bin/python" and o[o.index("--threads") + 1] == "3"


def test_a_venv_folder_the_script_did_not_build_is_left_alone(bp, tmp_path):
    theirs = tmp_path / "venvs" / "openvino"
    theirs.mkdir(parents=True)
    (theirs / "keep.txt").write_text("x")
    with pytest.raises(bp.UsageError, match="did not build"):
        bp.ensure_venv("openvino", str(tmp_path))
    assert (theirs / "keep.txt").read_text() == "x"


def test_results_are_written_as_json_and_markdown_with_the_machine_load(bp, tmp_path):
    args = bp.parse_args(["--out", str(tmp_path / "r"), "--contexts", "500", "--precisions", "fp32",
                          "--engines", "ours,ort-genai"])
    s = [dict(_sample(bp, "ours", 500, 2.0, 100.0, [1, 2], kv=8), load_avg_1min=3.5),
         dict(_sample(bp, "ort-genai", 500, 1.0, 50.0, [1, 3]), load_avg_1min=1.25)]
    md = bp.write_results(args, s)
    data = __import__("json").loads((tmp_path / "r" / "results.json").read_text())
    assert data["meta"]["load_avg_1min"] == [1.25, 3.5] and data["meta"]["threads"] == 2
    assert data["summary"]["fp32"]["ort-genai"]["contexts"]["500"]["agreement_with_ours"]["same"] == 1
    text = (tmp_path / "r" / "results.md").read_text()
    assert md in text and "load average (1 min) 1.2-3.5" in text and "2.00 s (2.00x)" in md


def test_the_fixture_options_size_the_decoder(bp, tmp_path):
    import inspect
    import json

    from adatoken_compile.models.testing import random_llava_hf

    assert set(bp.FIXTURE) <= set(inspect.signature(random_llava_hf).parameters)
    d = random_llava_hf(str(tmp_path / "hf"), layers=1, hidden=32, heads=4, kv_heads=2, intermediate=88, vocab=1000,
                        max_positions=512)
    t = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
    assert (t["intermediate_size"], t["vocab_size"], t["max_position_embeddings"]) == (88, 1000, 512)
    out = tmp_path / "decoder"
    bp.save_decoder(d, str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 1000 and "rope_theta" in cfg
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").shape == (1000, 32)
    assert "lm_head.weight" in keys and not any(k.startswith(("vision_tower", "multi_modal")) for k in keys)
    # the peers' decoder computes what the LLaVA's language model computes on the same ids
    import torch
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    ids = torch.tensor([[1, 5, 900, 17, 250]])
    with torch.no_grad():
        want = LlavaForConditionalGeneration.from_pretrained(d).eval()(input_ids=ids).logits
        got = LlamaForCausalLM.from_pretrained(str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_source_change_gives_this_tools_artifacts_a_new_cache_key(bp, tmp_path, monkeypatch):
    pkg = tmp_path / "adatoken_compile"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(bp, "ROOT", str(tmp_path))
    first = bp.code_key()
    assert bp.code_key() == first
    (pkg / "notes.txt").write_text("not code")
    assert bp.code_key() == first
    (pkg / "a.py").write_text("x = 2\n")
    assert bp.code_key() != first


def test_only_this_scripts_compiles_of_other_source_versions_are_removed(bp, tmp_path):
    def folder(name, manifest=True):
        (tmp_path / name).mkdir()
        if manifest:
            (tmp_path / name / "manifest.json").write_text("{}")

    for name in ("ours-fp32-aaaaaaaaaaaa", "ours-pruned-int4-aaaaaaaaaaaa", "ours-fp32-bbbbbbbbbbbb"):
        folder(name)
    folder("ours-int4-cccccccccccc", manifest=False)  # not a compile's output
    folder("ort-genai-fp32")
    folder("ours-fp32-mine")
    gone = bp.drop_stale_artifacts(str(tmp_path), "bbbbbbbbbbbb")
    assert gone == ["ours-fp32-aaaaaaaaaaaa", "ours-pruned-int4-aaaaaaaaaaaa"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ort-genai-fp32", "ours-fp32-bbbbbbbbbbbb",
                                                           "ours-fp32-mine", "ours-int4-cccccccccccc"]
