"""What every launcher shares: the `--config` flag, and one line instead of a traceback.

A launcher defines its flags (`define_config_flag`, `absl.flags`) and runs
`common.run_main(main)`.

`run_main` prints a `ValueError`, `OSError`, `ImportError` or `app.UsageError` leaving
`main` as `error: <message>` on stderr with exit status 1 (the traceback with
`--verbosity=1`): library messages say what is wrong and how to fix it. `parse_flags`
does the same for a bad flag, a config file that is missing or not a config, and an
override of a field the config lacks (with ml_collections' did-you-mean, or else the
fields there are).

Importing this module also quiets TensorFlow's start-up lines on stderr (the tfds data
path imports it), unless the environment already sets them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

# Before anything imports TensorFlow: its C++ start-up log lines would come before ours.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax.files import load_config_file, one_line

USER_ERRORS = (ValueError, OSError, ImportError, app.UsageError)
_CONFIG_FLAG_NAMES: list[str] = []  # the flags define_config_flag defined


def fail(message: str) -> NoReturn:
    """Prints `error: <message>` on stderr and exits with status 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def define_config_flag(help_string: str, *, default: str | None = None) -> flags.FlagHolder:
    """Defines `--config=configs/<file>.py[:variant]` and its `--config.<field>` overrides.

    Args:
      help_string: the flag's help.
      default: the config file used when the flag is not given (its `--config.<field>`
        overrides still apply); None: the flag is required.

    Returns:
      The FlagHolder; `.value` is the (locked) ConfigDict after parsing.
    """
    holder = config_flags.DEFINE_config_file("config", default, help_string)
    _CONFIG_FLAG_NAMES.append("config")
    if default is None:
        flags.mark_flag_as_required("config")
    return holder


class _TypedListParser(flags.ListParser):
    """A comma-separated list whose items are converted by `item_type`."""

    def __init__(self, item_type: Callable[[str], Any]):
        super().__init__()
        self._item_type = item_type

    def parse(self, argument: str | list) -> list:
        items = super().parse(argument)
        try:
            return [self._item_type(item) for item in items]
        except ValueError:
            raise ValueError(
                f"{argument!r} is not a comma-separated list of {self._item_type.__name__}s"
            ) from None

    def flag_type(self) -> str:
        return f"comma-separated list of {self._item_type.__name__}s"


def define_list(
    name: str,
    help_string: str,
    item_type: Callable[[str], Any] = str,
    default: str | None = None,
) -> flags.FlagHolder:
    """Defines `--<name>=a,b,c`, parsed once into a list of `item_type` (e.g. float).

    Args:
      name: the flag name.
      help_string: the flag's help.
      item_type: converts each item (raising ValueError on a bad one).
      default: the default as a comma-separated string, or None.

    Returns:
      The FlagHolder; `.value` is the list (None when not given and no default).
    """
    return flags.DEFINE(
        _TypedListParser(item_type),
        name,
        default,
        help_string,
        serializer=flags.CsvListSerializer(","),
    )


def _config_spec(name: str, argv: Sequence[str]) -> str | None:
    """The value given to `--<name>` in `argv` (the last one), if any."""
    spec = None
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.DOTALL)
        if match and match.group(1):
            spec = match.group(2)
        elif match and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _did_you_mean(error: BaseException | None) -> str:
    while error is not None:  # ml_collections puts it in a KeyError, maybe wrapped
        match = re.search(r"Did you mean .*?\?", str(error.args[0] if error.args else ""))
        if match:
            return match.group(0).replace("\\'", "'")
        error = error.__context__
    return ""


def _unknown_field(name: str, config: Any, argv: Sequence[str], error: BaseException) -> str:
    """Names the first `--<name>.<path>` override whose field the config lacks ('' if none)."""
    for arg in argv:
        match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if not match:
            continue
        node, walked = config, [name]
        for field in match.group(1).split("."):
            if not isinstance(node, ml_collections.ConfigDict):
                return (
                    f"--{name}.{match.group(1)}: {'.'.join(walked)} is a "
                    f"{type(node).__name__}, which has no field {field!r}"
                )
            if field not in node:
                hint = _did_you_mean(error) or f"Its fields: {', '.join(sorted(node.keys()))}."
                return (
                    f"--{name}.{match.group(1)}: {'.'.join(walked)} has no field {field!r}. {hint}"
                )
            node = node[field]
            walked.append(field)
    return ""


def _flag_error_message(error: BaseException, argv: Sequence[str]) -> str:
    for name in _CONFIG_FLAG_NAMES:
        spec = _config_spec(name, argv)
        if spec is None:
            continue
        config, problem = load_config_file(spec)
        if problem:
            return f"--{name}={spec}: {problem}"
        unknown = _unknown_field(name, config, argv, error)
        if unknown:
            return unknown
    return one_line(error)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses the command line (the `flags_parser` of `app.run`), failing in one line.

    Args:
      argv: the full command line, program name first.

    Returns:
      The positional arguments (program name first), as absl's parser returns them.
    """
    try:
        remaining = flags.FLAGS(argv)
    except Exception as e:  # absl's flags.Error, and what ml_collections lets through
        fail(_flag_error_message(e, argv))
    for name in _CONFIG_FLAG_NAMES:
        value = flags.FLAGS[name].value
        if value is not None and not isinstance(value, ml_collections.ConfigDict):
            # ml_collections defers a missing file's error to the first use of the config.
            spec = _config_spec(name, argv) or ""
            fail(f"--{name}={spec}: {load_config_file(spec)[1] or 'cannot load the config'}")
    return remaining


def run_main(main: Callable[[list[str]], Any], *, positional: bool = False) -> None:
    """Runs the launcher's `main(argv)` under `absl.app.run`, a user error (`USER_ERRORS`)
    shown as `error: <message>` and exit status 1 (traceback with --verbosity=1).
    Positional arguments are refused unless `positional`."""

    def wrapped(argv: list[str]) -> Any:
        try:
            if len(argv) > 1 and not positional:
                raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags need --)")
            return main(argv)
        except USER_ERRORS as e:
            logging.debug("traceback of the error below:", exc_info=True)
            message = str(e).strip() or type(e).__name__
            if isinstance(e, ImportError):
                message += " (a missing dependency? pip install -r requirements.txt)"
            fail(message)

    app.run(wrapped, flags_parser=parse_flags)
