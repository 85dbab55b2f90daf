"""``quickstart``: the main job on the bundled model (calibrate -> compile -> eval -> bench)."""

from __future__ import annotations

import click

from adatoken_compile.cli.main import main, user_errors


@main.command()
@click.option("--out", default="runs/quickstart", show_default=True, help="output directory")
@click.option("--overwrite", is_flag=True, help="replace an earlier quickstart output at --out")
@click.option("--limit", default=60, show_default=True, type=click.IntRange(10, None),
              help="test questions per policy for accuracy")
@click.option("--samples", default=None, type=click.IntRange(8, None), help="calibration questions (statistics)")
@click.option("--holdout", default=None, type=click.IntRange(2, None),
              help="other calibration questions that validate the adaptive schedules (the fidelity target needs "
                   "enough of them: 73 for 0.95, 381 for 0.99)")
@click.option("--fidelity", default=None, type=float,
              help="adaptive's agreement target, passed when the lower end of its 95% interval reaches it; default 0.95")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, None),
              help="interleaved timing rounds per artifact (bench itself defaults to 7)")
@click.option("--all-artifacts", is_flag=True, help="compile every policy's artifact and measure its accuracy with ORT "
              "(default: ORT for adaptive + identity; peers through the parity-tested PyTorch reference)")
@click.option("--model", default=None, help="checkpoint directory or short name (default: the bundled llava3d-tiny)")
@user_errors
def quickstart(out, overwrite, limit, samples, holdout, fidelity, repeats, all_artifacts, model):
    """The main job: calibrate -> compile -> eval -> bench on the bundled model, adaptive vs peers."""
    from adatoken_compile.quickstart import run_quickstart  # torch: not in the runtime install

    summary = run_quickstart(out, overwrite=overwrite, limit=limit, samples=samples, holdout=holdout, repeats=repeats,
                             all_artifacts=all_artifacts, model=model, fidelity=fidelity,
                             log=lambda m: click.echo(m, err=True))
    click.echo(summary)
