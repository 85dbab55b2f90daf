"""The command group, shared options and the one-line error handling every command uses."""

from __future__ import annotations

import functools
import inspect
import json
import sys

import click
from tqdm import tqdm

from adatoken_compile import api, distributed
from adatoken_compile.errors import InputError

MODEL_HELP = "checkpoint directory (LLaVA-3D layout or HF LLaVA) or bundled name; default: llava3d-tiny"


def default(fn, name: str):
    """The API's default of ``fn``'s parameter ``name`` (shown in --help; never duplicated here)."""
    return inspect.signature(fn).parameters[name].default


def given(**kw) -> dict:
    """Options the user gave (None = not given: the API's default applies)."""
    return {k: v for k, v in kw.items() if v is not None}


def scales_out(fn):
    """Mark a command that shares its work among torchrun's processes (the others refuse a launch
    of several)."""
    fn.scales_out = True
    return fn


def user_errors(fn):
    """InputError -> one line on stderr, exit 2 (no traceback). Under torchrun the command runs on
    every rank as one session: an error on any rank ends every rank with exit 2, and rank 0 prints
    that rank's line."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            with distributed.session():
                if distributed.active() and not getattr(fn, "scales_out", False):
                    raise InputError(f"{fn.__name__.removesuffix('_cmd')}: runs as one process; start it without "
                                     "torchrun (calibrate and eval scale out)")
                out = fn(*a, **kw)
        except InputError as e:
            if distributed.is_main():
                click.echo(f"error: {e}", err=True)
            distributed.close()
            sys.exit(2)
        distributed.close()
        return out

    return wrapper


def model_options(fn):
    fn = click.option("--attn", "attn", default="sdpa", show_default=True, type=click.Choice(["sdpa", "eager"]),
                      help="attention implementation of the decoder")(fn)
    fn = click.option("--vision-tower", default=None, help="local CLIP vision-tower directory (overrides mm_vision_tower)")(fn)
    fn = click.option("--model", "-m", default=None, help=MODEL_HELP)(fn)
    return fn


def provider_option(fn):
    return click.option("--provider", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                        help="ONNX Runtime execution provider (auto: CUDA when available)")(fn)


def load_model(model, vision_tower, attn):
    return api.load_model(model, vision_tower=vision_tower, attn=attn)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=float))


def progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not distributed.is_main())


class OneLineErrors(click.Group):
    """Usage errors (a bad option value, an unknown command) as one line, exit 2, like every other error."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            hint = f"; see `adatoken-compile {e.ctx.command_path.split(' ', 1)[-1]} --help`" \
                if getattr(e, "ctx", None) is not None and " " in e.ctx.command_path else "; see `adatoken-compile --help`"
            if distributed.is_main():  # under torchrun every rank meets the same usage error
                click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(2)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adatoken-compile")
def main():
    """Calibrate, compile and run spatial-token pruning for LLaVA-3D-style models."""

