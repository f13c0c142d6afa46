"""Command-line mistakes caught before Hydra starts: one message, exit 2, no traceback.

Hydra reports a failed composition with its own multi-line text (and sometimes a
traceback, e.g. for a run directory it cannot create). `check(argv)` composes the same
config with Hydra's compose API first and turns each failure into one line naming the key,
the value received and what is allowed. With `-m`/`--multirun` it composes every job of the
sweep (`sweep_jobs`), so that a value no job could run, or an empty list of values, stops the
sweep before any job starts. It only handles plain `key=value` overrides; with other Hydra
flags (`--cfg`, `-cn`...) it steps aside and Hydra reports as usual.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import math
import os
import tempfile
import typing

from omegaconf import DictConfig, OmegaConf

from trainer.config import (
    CONF_DIR,
    UserError,
    check_file,
    group_options,
    register_schemas,
    validate,
)
from trainer.startup import load_tensorflow_quietly

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
        options = group_options(group) or e.options  # (Hydra's own groups: its list)
        return f"{group}: received {name!r}; allowed: {' | '.join(options)}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line: {str(e).splitlines()[0]}"
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    fields = _fields(getattr(cause, "object_type", None))
    parent = getattr(cause, "parent_node", None)
    if not fields and "not in struct" in str(cause) and hasattr(parent, "keys"):
        fields = dict.fromkeys(parent.keys())  # a group without a schema (model): its keys
    if key:
        name = key.rpartition(".")[2]
        value = _received(key, overrides)
        if name not in fields and fields:
            group = key.rpartition(".")[0]
            hint = ""
            if "_target_" in fields:  # a `_target_` option: any constructor argument, with +
                hint = (
                    f". If it is an argument of {group}._target_'s constructor, add it with +: "
                    f"+{key}={value}"
                )
            return (
                f"{key}: unknown key (received {key}={value}); allowed keys in {group}: "
                f"{', '.join(sorted(fields))}{hint}"
            )
        if name in fields:
            return f"{key}: received {value!r}; allowed: {_describe(fields[name])}"
        return f"{key}: {str(cause).splitlines()[0]} (received {value!r})"
    return str(e).splitlines()[0]


_TARGETS = ("model._target_", "optimizer._target_", "schedule._target_", "loss._target_")


def check_inputs(cfg) -> None:
    """What can be known about the inputs without TensorFlow: the data file is there and is
    readable, a CSV has the target column, each `_target_`'s package can be found. UserError."""
    data = cfg.data
    if data.name in ("csv", "npz"):
        path = check_file(data.path)
        if data.name == "csv":
            _check_csv_header(path, str(data.target))
    if remote := cfg.checkpoint.get("remote"):  # the URL, and a probe of the store (one line)
        from trainer.remote.download import probed

        probed(str(remote))
    keys = [*_TARGETS, "data._target_"] + [f"metrics[{i}]" for i in range(len(cfg.metrics))]
    for key in keys:
        value = OmegaConf.select(cfg, key.replace("[", ".").replace("]", ""), default=None)
        if isinstance(value, DictConfig):
            value = value.get("_target_")
        if not isinstance(value, str) or "." not in value:
            continue  # absent, or not a dotted path: the build says what is wrong with it
        top = value.split(".", 1)[0]
        if importlib.util.find_spec(top) is None:
            raise UserError(
                f"{key}: received {value!r}; no module {top!r} on PYTHONPATH (add the "
                "directory that holds it: PYTHONPATH=<dir> python -m trainer ...)"
            )


def _check_parts(cfg) -> None:
    """A sweep's job: build its optimizer, schedule, loss and metrics (their arguments checked
    against their constructors), as the job would; UserError. TensorFlow loads for it, once
    per sweep (its start-up lines held back): a single run does this at its start instead."""
    load_tensorflow_quietly()  # (TensorFlow: only for a sweep; its start-up lines held back)
    from trainer.losses import build_objective
    from trainer.optim import build_optimizer

    build_optimizer(cfg.optimizer, cfg.schedule, int(cfg.trainer.max_steps))
    build_objective(cfg, "regression")


def _check_csv_header(path: str, target: str) -> None:
    try:
        with open(path, newline="") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"data.path: cannot read {path!r} as CSV ({e})") from None
    if target not in header:
        near = [h for h in header if h.lower() == target.lower()]
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UserError(f"data.target: received {target!r}{hint}; columns in {path!r}: {header}")


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
    try:  # os.access is no use as root: really write, sync (and remove) a file there
        with tempfile.TemporaryFile(dir=probe) as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"cannot write in {probe}: {e.strerror}"
    st = os.statvfs(probe)
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        return (
            f"No space left on device: {free // 1024} KiB free in {probe}, a run needs at least "
            f"{MIN_FREE_BYTES >> 20} MiB for its logs and checkpoints"
        )
    return None


MIN_FREE_BYTES = 1 << 20  # a full disk at start: less than this is refused before training


_MULTIRUN_FLAGS = ("-m", "--multirun")
_MAX_COMBINATIONS = 64  # more: each swept value checked once, with the others' first values


def sweep_jobs(overrides: list[str]) -> tuple[list[list[str]], str | None]:
    """The override lists of a sweep's jobs to check before any starts, or a problem line.

    Every combination of the swept values when there are at most 64 (Hydra's basic sweeper
    runs each one), else each value once with the first value of every other sweep. An
    interval (the Optuna sweeper's) is checked at both ends; a glob is left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        return [], message(e, overrides)
    fixed, swept = [], []
    optuna = any(str(o.input_line).replace(" ", "") == "hydra/sweeper=optuna" for o in parsed)
    for o in parsed:
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        if isinstance(o.value(), IntervalSweep):
            if not optuna:  # Hydra's basic sweeper runs lists of values only
                received = str(o.input_line).partition("=")[2]
                return [], (
                    f"{o.key_or_group}: received {received!r}, an interval; allowed with "
                    "Hydra's basic sweeper: a list of values (a,b,c), a range(...) or "
                    "choice(...); intervals need hydra/sweeper=optuna"
                )
            values = [o.value().start, o.value().end]
        else:
            try:
                values = list(o.sweep_string_iterator())
            except HydraException:  # a glob: only Hydra's config loader can expand it
                continue
        if not values:
            received = str(o.input_line).partition("=")[2]
            return [], (
                f"{o.key_or_group}: received {received!r}, an empty list of values; "
                "allowed: one value or more"
            )
        swept.append([f"{o.get_key_element()}={v}" for v in values])
    for values in swept:  # the same value twice: two jobs in one directory
        if len(set(values)) < len(values):
            dup = next(v for v in values if values.count(v) > 1)
            return [], (
                f"{dup.partition('=')[0]}: received {dup.partition('=')[2]!r} twice in one "
                "sweep; allowed: each value once (one job per directory)"
            )
    if math.prod(len(v) for v in swept) <= _MAX_COMBINATIONS:
        return [[*fixed, *c] for c in itertools.product(*swept)], None
    first = [v[0] for v in swept]
    jobs = [[*fixed, *first]]
    for i, values in enumerate(swept):
        jobs += [[*fixed, *first[:i], v, *first[i + 1 :]] for v in values[1:]]
    return jobs, None


def _schema_chosen(overrides: list[str]) -> str | None:
    """`data=csv_schema`: a schema is not an option (Hydra would compose it, without the
    option's defaults)."""
    for o in overrides:  # (one job's: a sweep's lists and choice() are expanded)
        group, eq, choice = o.lstrip("+~").partition("=")
        options = group_options(group) if eq and "." not in group else []
        if options and choice.endswith("_schema") and choice not in options:
            return f"{group}: received {choice!r}; allowed: {' | '.join(options)}"
    return None


def check(argv: list[str]) -> str | None:
    """Compose the config `python -m trainer argv` would get (with `-m`, every job's); the
    problem as one line, or None."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in _MULTIRUN_FLAGS for f in flags):
        return None  # other Hydra flags: let Hydra handle the command line itself
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = bool(flags) or "hydra.mode=MULTIRUN" in overrides
    jobs, problem = sweep_jobs(overrides) if multirun else ([overrides], None)
    if problem := problem or next(filter(None, map(_schema_chosen, jobs)), None):
        return problem
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    GlobalHydra.instance().clear()
    cfg = None
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            for job in jobs:
                swept = " ".join(o for o in job if o not in overrides)
                where = f" (in the sweep's job {swept})" if swept else ""
                try:
                    cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
                    validate(cfg)  # value checks too, before TensorFlow is even imported
                    check_inputs(cfg)
                    if multirun:  # a part no job could build stops the sweep before any job
                        _check_parts(cfg)
                except UserError as e:
                    return f"{e}{where}"
                except Exception as e:  # every composition failure is a command-line mistake
                    return message(e, job) + where
    finally:
        GlobalHydra.instance().clear()
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        out_dir = str(OmegaConf.select(cfg, key))
    except Exception:  # an interpolation only Hydra's runtime can resolve
        return None
    problem = _writable_dir_problem(out_dir)
    if problem:
        return f"{key}: received {out_dir!r}; {problem}. Allowed: a writable directory"
    return None
