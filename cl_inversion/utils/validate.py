"""Check the composed config before anything runs or is written.

Hydra's schema (`config.py`) already rejects typos and wrong types in the top-level keys. The
groups (dataset, backbone, method, trainer, logger, optimizer, callbacks) are free-form nodes with a
`_target_`; here every such node is checked against its target's signature, so `+method.temprature=3`
or `method.temperature=abc` fails in a second with the key named, not after a task of training.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from cl_inversion.utils.errors import ConfigError

_SIMPLE = (bool, int, float, str, type(None))


def validate_config(cfg: DictConfig, extra_keys: Mapping[str, Mapping[str, type]] | None = None) -> None:
    """Raise `ConfigError` for an unimportable `_target_`, an unknown key or a scalar of the wrong type.

    `extra_keys` maps a node path (e.g. "dataset") to keys the framework reads itself (not passed to
    the target) and their types.
    """
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # a broken ${interpolation}
        raise ConfigError(f"config does not resolve: {err}".replace("\n", " ")) from None
    for path, node in _target_nodes(container, ""):
        _check_node(path, node, dict((extra_keys or {}).get(path, {})))


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from _target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _target_nodes(value, f"{path}[{i}]")


def _check_node(path: str, node: dict, extra: dict[str, type]) -> None:
    target_name = node["_target_"]
    try:
        target = get_object(target_name)
    except Exception:
        raise ConfigError(f"{path}._target_={target_name!r} cannot be imported; check the module and name") from None
    params, open_ended = _parameters(target)
    for key, value in node.items():
        if key.startswith("_"):
            continue
        if key in extra:
            expected: Any = extra[key]
            default = inspect.Parameter.empty
        elif key in params:
            expected, default = params[key]
        elif open_ended:
            continue
        else:
            raise ConfigError(f"{path}.{key} is not a parameter of {target_name}; "
                              f"allowed: {', '.join(sorted(params) + sorted(extra)) or '(none)'}")
        if value is None and default is None:
            continue
        allowed = _simple_types(expected)
        if allowed is not None and isinstance(value, _SIMPLE) and not _fits(value, allowed):
            raise ConfigError(f"{path}.{key}={value!r} has the wrong type: {target_name} expects "
                              f"{' or '.join(sorted('null' if t is type(None) else t.__name__ for t in allowed))}")


def _parameters(target: Any) -> tuple[dict[str, tuple[Any, Any]], bool]:
    """Named parameters of a callable or class (following `**kwargs` up the MRO) -> (annotation, default);
    and whether it still accepts arbitrary keywords."""
    functions = []
    if inspect.isclass(target):
        for cls in target.__mro__:
            if "__init__" in cls.__dict__ and cls is not object:
                functions.append(cls.__dict__["__init__"])
                if not _has_var_keyword(cls.__dict__["__init__"]):
                    break
        else:
            return _collect(functions), True
    else:
        functions.append(target)
    return _collect(functions), bool(functions) and _has_var_keyword(functions[-1])


def _has_var_keyword(fn: Any) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True


def _collect(functions: list[Any]) -> dict[str, tuple[Any, Any]]:
    params: dict[str, tuple[Any, Any]] = {}
    for fn in functions:
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable annotation: check names only
            hints = {}
        for name, p in signature.parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in params:
                params[name] = (hints.get(name), p.default)
    return params


def _simple_types(annotation: Any) -> set[type] | None:
    """The scalar types an annotation allows, or None when it allows something we do not check."""
    if annotation in _SIMPLE:
        return {annotation}
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin in (typing.Union, types.UnionType):
        allowed: set[type] = set()
        for arg in typing.get_args(annotation):
            sub = _simple_types(arg)
            if sub is None:
                return None
            allowed |= sub
        return allowed
    return None


def _fits(value: Any, allowed: set[type]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return type(value) in allowed
