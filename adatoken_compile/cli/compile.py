"""``compile`` and ``diff``: the token-drop pass on the captured graph, exported as an artifact."""

from __future__ import annotations

import click

from adatoken_compile import api
from adatoken_compile.cli.main import default, given, load_model, main, model_options, user_errors
from adatoken_compile.errors import InputError
from adatoken_compile.io import check_output


@main.command("compile")
@model_options
@click.option("--schedule", "-s", "schedule", default=None,
              help="schedule.json from `calibrate` (default: identity, i.e. unpruned)")
@click.option("--out", "-o", required=True, help="artifact directory to write")
@click.option("--overwrite", is_flag=True, help="replace an earlier artifact at --out")
@click.option("--opset", default=None, type=click.IntRange(api.MIN_OPSET, None),
              help=f"ONNX opset, >= {api.MIN_OPSET} (default: the exporter's)")
@click.option("--no-decode", is_flag=True, help="skip the decode graph (the artifact then answers 1 token)")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help=f"precision the graphs compute in [default: {default(api.compile, 'dtype')}]; "
                   "bfloat16 runs on CUDA only")
@click.option("--quantize", default=None, type=click.Choice(["int4"]),
              help="weight-only int4 of the decoder's linear layers (onnxruntime MatMulNBits)")
@click.option("--block-size", default=None, type=int,
              help=f"with --quantize: weights per quantisation block [default: {default(api.compile, 'block_size')}]")
@click.option("--reuse", default=None, metavar="ART",
              help="copy the encoder and decode graphs of this earlier artifact of the same model and precision "
                   "instead of exporting them (they do not depend on the schedule)")
@user_errors
def compile_cmd(model, vision_tower, attn, schedule, out, overwrite, opset, no_decode, dtype, quantize, block_size,
                reuse):
    """Capture, prune (token-drop pass) and export ONNX graphs into an artifact directory."""
    if block_size is not None and not quantize:
        raise InputError("--block-size applies to --quantize int4; add --quantize int4 or drop --block-size")
    opts = given(dtype=dtype, quantize=quantize, block_size=block_size)
    check_output(out, "artifact", overwrite=overwrite)  # before the model is loaded
    # the decoder's weights stay on disk until written: a 7B model compiles in a few GB
    adapter = api.load_model(model, vision_tower=vision_tower, attn=attn, lazy=True, **given(dtype=dtype))
    man = api.compile(adapter, schedule, out, decode=not no_decode, overwrite=overwrite, opset=opset, reuse=reuse,
                      **opts)
    click.echo(f"wrote {man.path} in {man.data['compile_s']:.1f}s")
    for name, g in man.graphs.items():
        click.echo(f"  {name:<10} {g['file']:<16} {man.graph_bytes(name) / 1e6:9.2f} MB  opset {g['opset']}")
    prec = man.data["precision"]
    q = prec["quantize"]
    click.echo(f"  precision  {prec['dtype']}" + (f", int4 weights in blocks of {q['block_size']}" if q else "")
               + (f" (inputs / outputs {prec['io_dtype']})" if prec["io_dtype"] != prec["dtype"] else ""))
    total = sum(f["size"] for f in man.files.values())
    click.echo(f"  total      {len(man.files)} files      {total / 1e6:9.2f} MB")
    click.echo(f"  digest     {man.digest}")


@main.command()
@model_options
@click.option("--schedule", "-s", "schedule", required=True, help="schedule.json")
@user_errors
def diff(model, vision_tower, attn, schedule):
    """Print what the token-drop pass changes in the captured prefill graph, per cut."""
    from adatoken_compile.compiler.pipeline import diff_text  # torch: not in the runtime install

    adapter = load_model(model, vision_tower, attn)
    click.echo(diff_text(adapter, api._schedule_for(adapter, schedule)))
