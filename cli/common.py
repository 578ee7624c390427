"""Shared pieces of the command line: logging, error handling, options generated from configs."""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
import traceback
from pathlib import Path

import click

from freeshap_dq.config import METRICS, PRESETS, ValuationConfig, field_choices
from freeshap_dq.errors import FreeShapError
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.ntk.builder import NTKConfig
from freeshap_dq.scores import DEFAULT_METRIC, DEFAULT_Z

DATA_PATH = click.Path(path_type=Path)  # a file, or a folder saved by Hugging Face datasets
ARTIFACT_PATH = click.Path(path_type=Path)  # a .npz, or a kernel / result folder
EXIT_RUNTIME, EXIT_USAGE, EXIT_GATE, EXIT_INTERRUPTED = 1, 2, 3, 130
VERBOSITY = {"level": 1}  # 0 = errors only (-q), 1 = normal, 2 = tracebacks on failure (-v)

CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(ValuationConfig)}
NTK_FIELDS = {f.name: f for f in dataclasses.fields(NTKConfig)}
CHOICES = {**field_choices(ValuationConfig), **field_choices(NTKConfig)}
OPTION_NAMES = {"kernel": "--kernel-mode"}  # --kernel is the precomputed kernel file


def metric_option(help_text: str = "Value that ranks: ce (-cross-entropy utility) or accuracy."):
    return click.option("--metric", type=click.Choice(list(METRICS)), default=DEFAULT_METRIC, show_default=True,
                        help=help_text)


def z_option(help_text: str):
    return click.option("--z", type=float, default=DEFAULT_Z, show_default=True, help=help_text)


def log(message: str) -> None:
    if VERBOSITY["level"] > 0:
        click.echo(message, err=True)


class _ToLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log(record.getMessage())


def route_library_logs() -> None:
    """The library's ``freeshap_dq`` logger (e.g. "resuming from the checkpoint ...") prints like ``log``."""
    logger = logging.getLogger("freeshap_dq")
    if not any(isinstance(h, _ToLog) for h in logger.handlers):
        logger.addHandler(_ToLog())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def optional_adapter(name: str, extra: str, what: str):
    """``freeshap_dq.integrations.<name>``, or a clear error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(f"freeshap_dq.integrations.{name}")
    except ImportError:
        raise FreeShapError(f"this command needs {what}: pip install 'freeshap-dq[{extra}]'") from None


def friendly_errors(func):
    """Our errors -> 'error: ...' and exit 2; other failures -> exit 1 (traceback with -v); Ctrl-C -> 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FreeShapError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting prints no traceback
            click.echo("interrupted. With --checkpoint-dir (values) or -o NAME.kernel (kernel folders), rerun the "
                       "same command to resume where it stopped.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.ClickException, click.exceptions.Exit, SystemExit):
            raise
        except Exception as exc:  # a runtime failure: say what, keep the traceback for -v
            if VERBOSITY["level"] > 1:
                traceback.print_exc()
            said = f"{type(exc).__name__}: {exc}" if str(exc) else (
                f"{type(exc).__name__}, an internal error of freeshap-dq with no message; please report it with "
                f"the traceback")
            click.echo(f"error: {said} (run with -v for the traceback)", err=True)
            sys.exit(EXIT_RUNTIME)

    return wrapper


def dataclass_options(fields: dict, skip: tuple[str, ...] = ()):
    """One option per dataclass field, help text from the field's metadata, default None = not given."""

    def decorate(func):
        for name in reversed([n for n in fields if n not in skip]):
            f = fields[name]
            flag = OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
            help_text = f"{f.metadata['help']} [default: {f.default}]"
            if isinstance(f.default, bool):
                func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(func)
            elif choices := f.metadata.get("choices") or CHOICES.get(name):  # the field's own choices first
                func = click.option(flag, name, type=click.Choice(choices), default=None, help=help_text)(func)
            else:
                func = click.option(flag, name, type=type(f.default), default=None, help=help_text)(func)
        return func

    return decorate


def config_options(func):
    """ValuationConfig options plus --preset."""
    func = dataclass_options(CONFIG_FIELDS)(func)
    return click.option("--preset", type=click.Choice(sorted(PRESETS)), default="default", show_default=True,
                        help="Starting values for the options: 'paper' reproduces the reference "
                             "(tolerance 0.05, kernel/1e4, ridge 1e-6, accuracy ranking).")(func)


def column_options(func):
    """--text-column, --pair-column, --label-column, --id-column (see pop_data_options)."""
    for flag, default, help_text in reversed([
        ("--text-column", "text", "Column with the text."),
        ("--pair-column", None, "Column with the second text of sentence pairs."),
        ("--label-column", "label", "Column with the label."),
        ("--id-column", None, "Column with unique example ids [default: 'id' when the table has it, else the row "
                              "numbers]; a column named here must exist."),
    ]):
        func = click.option(flag, default=default, show_default=default is not None, help=help_text)(func)
    return click.option("--allow-label-variants", is_flag=True,
                        help="Accept labels that differ only by case or spaces ('fresh' / 'Fresh ') as different "
                             "classes, and labels such as 'NaN' (refused otherwise).")(func)


def data_options(required: bool):
    def decorate(func):
        func = column_options(func)
        path = DATA_PATH
        func = click.option("--test", "test_path", type=path, required=required,
                            help="Test/validation data (.csv/.tsv/.jsonl/.json/.parquet).")(func)
        return click.option("--train", "train_path", type=path, required=required,
                            help="Training data (.csv/.tsv/.jsonl/.json/.parquet).")(func)

    return decorate


def ntk_options(func):
    func = dataclass_options(NTK_FIELDS, skip=("device",))(func)
    return click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Reuse kernels computed before with the same model, settings and data.")(func)


def build_ntk_config(options: dict, device: str | None) -> NTKConfig:
    """The NTKConfig of the options, which are removed from ``options`` — except those the valuation settings
    share (``--device``), which stay there for :func:`build_config`."""
    given = {k: options.pop(k) for k in list(options) if k in NTK_FIELDS and k not in CONFIG_FIELDS}
    if device is not None:
        given["device"] = device
    return NTKConfig(**{k: v for k, v in given.items() if v is not None})


def load_problem(kernel_path, train_path, test_path, data: dict, ntk: NTKConfig, cache_dir, progress,
                 shard: tuple[int, int] = (0, 1)):
    """(KernelProblem, kernel manifest) from a kernel file, or from data + model (eNTK computed or cached)."""
    if kernel_path is not None:
        if train_path is not None or test_path is not None:
            raise click.UsageError("give either --kernel or --train/--test, not both.")
        return KernelProblem.load(kernel_path), {"kernel_file": str(kernel_path)}
    if train_path is None or test_path is None:
        raise click.UsageError("give --kernel K.npz, or both --train and --test data files.")
    if ntk.landmarks or ntk.example_block:
        flag = "--landmarks" if ntk.landmarks else "--example-block"
        raise click.UsageError(f"{flag} builds a kernel folder on disk: run freeshap-dq kernel --train ... --test ... "
                               f"-o NAME.kernel {flag} ..., then give --kernel NAME.kernel here.")
    from freeshap_dq.data.tables import load_dataset
    from freeshap_dq.ntk.builder import build_kernel

    train = load_dataset(train_path, **data)
    test = load_dataset(test_path, **data)
    return build_kernel(train, test, ntk, cache_dir=cache_dir, progress=progress, log=log, return_manifest=True,
                        shard=shard)


def given_on_command_line(*names: str) -> list[str]:
    """The options among ``names`` (parameter names) that the user typed, as flags (``--text-column``)."""
    ctx = click.get_current_context()
    flags = {p.name: p.opts[0] if p.opts[0].startswith("--") else p.opts[-1] for p in ctx.command.params}
    return [flags[name] for name in names
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]


def refuse_unused(reason: str, *names: str) -> None:
    """Refuse options the user typed that this invocation cannot use (instead of ignoring them)."""
    typed = given_on_command_line(*names)
    if typed:
        raise click.UsageError(f"{', '.join(typed)} {'does' if len(typed) == 1 else 'do'} not apply {reason}.")


DATA_COLUMN_OPTIONS = ("text_column", "pair_column", "label_column", "id_column", "allow_label_variants")


def pop_data_options(options: dict) -> dict:
    data = {k: options.pop(k) for k in ("text_column", "label_column", "id_column", "pair_column",
                                        "allow_label_variants")}
    data["id_required"] = data["id_column"] is not None
    data["id_column"] = data["id_column"] or "id"
    return data


def build_config(preset: str, options: dict) -> ValuationConfig:
    given = {k: options.pop(k) for k in list(options) if k in CONFIG_FIELDS}
    return ValuationConfig.preset(preset, **{k: v for k, v in given.items() if v is not None})


