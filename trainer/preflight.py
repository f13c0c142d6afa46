"""Command-line mistakes caught before Hydra starts: one message, exit 2, no traceback.

Hydra reports a failed composition with its own multi-line text (and sometimes a
traceback, e.g. for a run directory it cannot create). `check(argv)` composes the same
config with Hydra's compose API first and turns each failure into one line naming the key,
the value received and what is allowed. It only handles plain `key=value` overrides; with
Hydra flags (`--multirun`, `--cfg`, `-cn`...) it steps aside and Hydra reports as usual.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import typing

from trainer.config import CONF_DIR, UserError, register_schemas, validate

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:  # X | None
        return " or ".join(_describe(a) for a in args) + " or null"
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _fields(object_type) -> dict:
    if object_type is not None and dataclasses.is_dataclass(object_type):
        try:
            hints = typing.get_type_hints(object_type)
        except Exception:
            hints = {}
        return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(object_type)}
    return {}


def _received(key: str, overrides: list[str]) -> str:
    for o in overrides:
        k, sep, v = o.lstrip("+~").partition("=")
        if sep and k == key:
            return v
    return "?"


def message(e: Exception, overrides: list[str]) -> str:
    """One line for a Hydra/OmegaConf composition error."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException) and e.options:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        return f"{group}: received {name!r}; allowed: {' | '.join(e.options)}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line: {str(e).splitlines()[0]}"
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    fields = _fields(getattr(cause, "object_type", None))
    if key:
        name = key.rpartition(".")[2]
        value = _received(key, overrides)
        if name not in fields and fields:
            group = key.rpartition(".")[0]
            return (
                f"{key}: unknown key (received {key}={value}); allowed keys in {group}: "
                f"{', '.join(sorted(fields))}"
            )
        if name in fields:
            return f"{key}: received {value!r}; allowed: {_describe(fields[name])}"
        return f"{key}: {str(cause).splitlines()[0]} (received {value!r})"
    return str(e).splitlines()[0]


def _writable_dir_problem(run_dir: str) -> str | None:
    """Why the run directory could not be created or written, or None if it can."""
    path = os.path.abspath(run_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        return "it exists and is not a directory"
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    try:  # os.access is no use as root: really create (and remove) a file there
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f"cannot write in {probe}: {e.strerror}"
    return None


def check(argv: list[str]) -> str | None:
    """Compose the config `python -m trainer argv` would get; the problem as one line, or None."""
    if any(a.startswith("-") for a in argv):
        return None  # Hydra flags: let Hydra handle the command line itself
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(argv), return_hydra_config=True)
    except Exception as e:  # every composition failure is a command-line mistake
        return message(e, list(argv))
    finally:
        GlobalHydra.instance().clear()
    try:
        validate(cfg)  # value checks too, before TensorFlow is even imported
    except UserError as e:
        return str(e)
    try:
        run_dir = str(cfg.hydra.run.dir)
    except Exception:  # an interpolation only Hydra's runtime can resolve
        return None
    problem = _writable_dir_problem(run_dir)
    if problem:
        return f"hydra.run.dir: received {run_dir!r}; {problem}. Allowed: a writable directory"
    return None
