"""The command group, shared options and the one-line error handling every command uses."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import warnings

import click
from tqdm import tqdm

from adatoken_compile import api, distributed
from adatoken_compile.runtime.sources import DataWarning
from adatoken_compile.errors import InputError
from adatoken_compile.io import signals_cleanup
from adatoken_compile.runtime.session import choose_providers

DEBUG_ENV = "ADATOKEN_COMPILE_DEBUG"  # set to 1: unexpected errors show their traceback

MODEL_HELP = "checkpoint directory (LLaVA-3D layout, HF LLaVA or Qwen2.5-VL) or bundled name; default: llava3d-tiny"


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
                                     "torchrun (calibrate, eval and compare scale out)")
                out = fn(*a, **kw)
        except InputError as e:
            if distributed.is_main():
                click.echo(f"error: {_one_line(e)}", err=True)
            distributed.close()
            _leave_launch(2)
        distributed.close()
        return out

    return wrapper


def _leave_launch(code: int):
    """Exit with ``code``; a rank of a torchrun launch skips the interpreter's teardown: the group is
    left and the line printed, and the teardown of torch's threads after a peer rank has gone can
    abort the process (SIGABRT, exit 134, instead of the 2 the user's script checks)."""
    if distributed.launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def model_options(fn):
    fn = click.option("--attn", "attn", default="sdpa", show_default=True, type=click.Choice(["sdpa", "eager"]),
                      help="attention implementation of the decoder")(fn)
    fn = click.option("--vision-tower", default=None, help="local CLIP vision-tower directory (overrides mm_vision_tower)")(fn)
    fn = click.option("--model", "-m", default=None, help=MODEL_HELP)(fn)
    return fn


def data_options(fn):
    """--scenes and --depth-scale: where a question file's scenes are and how their depth is stored."""
    fn = click.option("--depth-scale", default=None, type=click.FloatRange(0, None, min_open=True),
                      help="depth PNG units per metre of scene folders [default: the info file's, else 1000 (mm)]")(fn)
    fn = click.option("--scenes", default=None, help="where the question file's scene ids resolve: a folder holding "
                      "<scene_id>/ scene folders (or <scene_id>.npz), or an EmbodiedScan info .json")(fn)
    return fn


def provider_option(fn):
    return click.option("--provider", default="auto", show_default=True,
                        type=click.Choice(["auto", "cpu", "cuda", "openvino"]),
                        help="ONNX Runtime execution provider (auto: CUDA when available; cuda / openvino: an "
                             "error when it is not; openvino computes in float32)")(fn)


def check_provider(provider: str) -> None:
    """Refuse ``--provider cuda`` without CUDA before any model or artifact is loaded."""
    choose_providers(provider)


def load_model(model, vision_tower, attn, **kw):
    return api.load_model(model, vision_tower=vision_tower, attn=attn, **kw)


def placement_options(fn):
    """--device and --dtype: where the PyTorch model runs and in what precision."""
    fn = click.option("--dtype", default="float32", show_default=True,
                      type=click.Choice(["float32", "bfloat16", "float16"]),
                      help="precision of the PyTorch model (attention statistics and selection scores are "
                           "accumulated in float32 whatever it is)")(fn)
    fn = click.option("--device", default="cpu", show_default=True,
                      help="where the PyTorch model runs: cpu, cuda or cuda:N (under torchrun, cuda is each "
                           "process's LOCAL_RANK GPU)")(fn)
    return fn


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=float))


def progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not distributed.is_main())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Data warnings (frames skipped, ...) as one ``warning:`` line; others as Python prints them."""
    if issubclass(category, DataWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


# the packages of the [compile] extra (pyproject.toml), by import name
COMPILE_EXTRA = {"torch", "transformers", "jinja2", "safetensors", "onnx", "onnxscript", "onnx_ir", "matplotlib"}


class OneLineErrors(click.Group):
    """Every error as one line on stderr, never a traceback: bad input (usage errors, InputError, a
    file the system refuses) exits 2; an interrupt removes the command's temporary outputs and
    exits 128 + the signal; anything unexpected is a bug, reported in one line with exit 1
    (``ADATOKEN_COMPILE_DEBUG=1`` shows its traceback)."""

    def main(self, *args, **kwargs):
        warnings.showwarning = _one_line_warning
        try:
            with signals_cleanup():
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
                click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
            sys.exit(2)
        except InputError as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(2)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{_one_line(e.strerror or e)}; check the path, its permissions and free space",
                       err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; temporary outputs removed", err=True)
            sys.exit(130)
        except ImportError as e:
            top = (getattr(e, "name", None) or "").split(".")[0]
            if top not in COMPILE_EXTRA:
                _internal_error(e)
            # the runtime install lacks what calibrate, compile, eval and make-tiny need: the user's
            # install to complete, not a bug to report
            click.echo(f"error: this command needs the [compile] extra ({top} is not installed); install it with "
                       "pip install 'adatoken-compile[compile]', or use `run --artifact` (runtime only)", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory; use a smaller input (fewer views, a smaller --limit) or more memory",
                       err=True)
            sys.exit(2)
        except Exception as e:
            _internal_error(e)


def _internal_error(e: Exception):
    if os.environ.get(DEBUG_ENV):
        raise e
    click.echo(f"error: internal error ({type(e).__name__}: {_one_line(e)[:300]}); this is a bug, please "
               f"report it with the command line (set {DEBUG_ENV}=1 for the traceback)", err=True)
    sys.exit(1)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adatoken-compile")
def main():
    """Calibrate, compile and run spatial-token pruning for LLaVA-3D-style models."""

