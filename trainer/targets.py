"""Plug points by `_target_` (Hydra's convention): a dotted path to a class or a function,
and the constructor's own arguments beside it.

Every group that takes a user's part (`model`, `optimizer`, `schedule`, `loss`, `metrics`,
`data=custom`) goes through here, so that each gets the same three checks before anything is
built, each a one-line UserError (exit 2): the path imports, the object is the right kind, and
every key given is an argument its constructor (or function) accepts.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.config import UserError


def import_target(key: str, path: Any):
    """The object `path` ('pkg.module.Name') names; `key` is the config key, for messages."""
    module, _, name = str(path).rpartition(".")
    if not module or not name:
        raise UserError(
            f"{key}: received {path!r}; allowed: a dotted path such as mypkg.module.Name"
        )
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise UserError(
            f"{key}: received {path!r}; cannot import module {module!r} ({e}). "
            "Is its package on PYTHONPATH?"
        ) from None
    except Exception as e:  # the user's module raised while being imported
        raise UserError(
            f"{key}: received {path!r}; importing {module!r} failed: {type(e).__name__}: {e}"
        ) from None
    try:
        return getattr(obj, name)
    except AttributeError:
        raise UserError(f"{key}: received {path!r}; module {module!r} has no {name!r}") from None


def accepted(fn) -> tuple[list[str], bool]:
    """(named arguments `fn` accepts, whether it takes **kwargs beyond them). For a class, its
    constructor's; a constructor that passes **kwargs on to its base class (a Keras subclass)
    accepts the base's named arguments too."""
    names: list[str] = []
    classes = inspect.getmro(fn) if inspect.isclass(fn) else (None,)
    for cls in classes:
        if cls is object:
            break
        target = cls.__init__ if cls is not None else fn
        if cls is not None and "__init__" not in vars(cls):
            continue  # inherits its constructor: read it from the base
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):  # a builtin: nothing to check against
            return names, True
        names += [
            p
            for p, v in params.items()
            if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL) and p not in names
        ]
        if not any(v.kind == v.VAR_KEYWORD for v in params.values()):
            return names, False
    return names, cls is object or cls is None


def arguments(group: DictConfig, own: tuple[str, ...]) -> dict:
    """A group's keys as constructor or function arguments (plain containers, interpolations
    resolved), without the group's own keys (`_target_`, `name`...)."""
    kwargs = OmegaConf.to_container(group, resolve=True)
    return {k: v for k, v in kwargs.items() if k not in own}


def check_arguments(group: str, fn, kwargs: dict, extra_ok: tuple[str, ...] = ()) -> None:
    """Refuse a key that is not an argument of `fn` (nor one of `extra_ok`). A function that
    takes **kwargs takes any key; a class is held to the named arguments of its
    constructors (a Keras class passes **kwargs to its base, which refuses unknown ones)."""
    names, open_ended = accepted(fn)
    if open_ended and not inspect.isclass(fn):
        return
    for key in kwargs:
        if key not in names and key not in extra_ok:
            what = getattr(fn, "__qualname__", repr(fn))
            raise UserError(
                f"{group}.{key}: not an argument of {what}; allowed: {', '.join(names)}"
            )


def call(group: str, fn, kwargs: dict):
    """`fn(**kwargs)`, its TypeError/ValueError as one line naming the group."""
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as e:
        what = getattr(fn, "__qualname__", repr(fn))
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UserError(f"{group}: {what}({shown}) failed: {e}") from None


def kind(obj) -> str:
    """'a class (Name)' or 'a <type>', for messages about what a `_target_` named."""
    return f"a class ({obj.__name__})" if inspect.isclass(obj) else f"a {type(obj).__name__}"
