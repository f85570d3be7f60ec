"""The project's one YAML config loader, with one error policy, and the check that every config key means something.

:func:`read_yaml` reads one file (a missing or unreadable file is a one-line :class:`ConfigError` naming the flag it
came from); :func:`load_configs` merges several (``main.py --base``) and applies ``key=value`` overrides;
:func:`load_model_config` reads a model config for generation and evaluation.

A mistyped key used to be ignored silently (``...personalization_config.params.num_vector_per_token=4`` trained
with the default 2 vectors). Now :func:`check_overrides` refuses an override whose key is neither in the config nor a
parameter of the class that will receive it, and :func:`check_target_params` refuses a ``params`` key that its
``target`` class does not take, both naming the closest existing key. Which keys a class takes is read from the
``__init__`` signatures along its base classes: a ``**kwargs`` is taken to be passed on to the base class (so it is
checked there; the framework bases, ``torch.nn.Module`` and Lightning's, take none), while a class that accepts and
ignores extra keys on purpose says so by naming its catch-all ``**unused_...`` (e.g. the autoencoders' training keys).

Only :mod:`omegaconf` and :mod:`yaml` are imported here; a target class only when its keys are checked.
"""
from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.errors import ConfigError


_FRAMEWORK_MODULES = ("builtins", "torch.", "pytorch_lightning.", "lightning.", "lightning_fabric.")
# Nodes without a ``target`` whose keys go to a known class as keyword arguments.
_IMPLIED_TARGETS = {
    ("lightning", "trainer"): "pytorch_lightning.Trainer",
    ("lightning", "modelcheckpoint", "params"): "pytorch_lightning.callbacks.ModelCheckpoint",
}


# Mappings whose keys are free names chosen by the user (a callback's name): a new name there is a new entry, whose
# own keys check_target_params checks once the override is applied.
_OPEN_MAPPINGS = {("lightning", "callbacks")}


def read_yaml(path: str | os.PathLike, flag: str) -> DictConfig:
    """One YAML config file as a ``DictConfig``; a one-line :class:`ConfigError` naming ``flag`` otherwise."""
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"{flag}: config file '{path}' {what}; check the path (configs/ holds the shipped ones)")
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{flag}: '{path}' is not a readable YAML config ({type(err).__name__})") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{flag}: '{path}' holds a YAML {type(loaded).__name__}, not a mapping of config sections")
    return loaded


def load_configs(paths: Sequence[str], dotlist: Sequence[str], flag: str = "--base") -> DictConfig:
    """Merge the configs given with ``flag`` left to right, then the ``key=value`` overrides (each checked first)."""
    if not paths:
        raise ConfigError(f"no config given; pass one with {flag} configs/...yaml")
    try:
        base = OmegaConf.merge(*(read_yaml(path, flag) for path in paths))
        check_overrides(base, dotlist)
        return OmegaConf.merge(base, OmegaConf.from_dotlist(list(dotlist)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config override failed: {str(err).splitlines()[0]}") from err
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config override failed: a value of {list(dotlist)} is not valid YAML ({str(err).splitlines()[0]}); quote "
            "strings that hold brackets, braces or colons, e.g. 'key=[\"a [b] {}\"]'"
        ) from err


def load_model_config(path: str | os.PathLike, flag: str = "--config", example: str = "configs/...yaml") -> DictConfig:
    """A model config (one file with a ``model`` section), for generation and evaluation."""
    loaded = read_yaml(path, flag)
    if "model" not in loaded:
        raise ConfigError(f"{flag}: '{path}' has no 'model' section; pass a model config such as {example}")
    return loaded


# ------------------------------------------------------------------------------------------------------ key checks
def accepted_keys(target: str) -> set[str] | None:
    """The keyword arguments class ``target`` takes from a config, or None when it takes any (or cannot be read)."""
    from ldm.util import get_obj_from_str

    try:
        cls = get_obj_from_str(target)
    except (ImportError, AttributeError, ValueError):
        return None  # building the model reports an unknown target itself
    names: set[str] = set()
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else ():
        if klass.__module__.startswith(_FRAMEWORK_MODULES) and klass is not cls:
            break
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        catch_all = [p.name for p in params if p.kind == p.VAR_KEYWORD]
        if not catch_all:
            return names - {"self"}
        if catch_all[0].startswith("unused"):
            return None
    if not inspect.isclass(cls):
        return None
    return names - {"self"}


def _closest(key: str, options: Iterable[str]) -> str:
    near = difflib.get_close_matches(key, sorted(set(options)), n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _refuse_unknown(item: str, target: str, where: str, key: str, existing: Iterable[str]) -> None:
    """A :class:`ConfigError` unless class ``target`` takes ``key`` (``item``: the override, for the message)."""
    accepted = accepted_keys(target)
    if accepted is not None and key not in accepted:
        raise ConfigError(
            f"config override '{item}': {target.rsplit('.', 1)[-1]} ({where}) has no parameter '{key}'"
            f"{_closest(key, [*existing, *accepted])}"
        )


def check_overrides(config: DictConfig, dotlist: Sequence[str]) -> None:
    """Every ``key=value`` override must name a key of ``config`` or a parameter of the class receiving it."""
    plain = OmegaConf.to_container(config, resolve=False)
    for item in dotlist:
        parts = item.split("=", 1)[0].strip().split(".")
        node: Any = plain
        receiver: str | None = None  # the class that takes the keys of ``node``
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "the top level"
            if tuple(parts[:depth]) in _OPEN_MAPPINGS and not (isinstance(node, dict) and part in node):
                break  # a new entry of a free-named mapping (e.g. lightning.callbacks.my_callback.target=...)
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node, receiver = node[int(part)], None
            elif isinstance(node, dict) and part in node:
                is_params = part == "params" and isinstance(node.get("target"), str)
                receiver = node["target"] if is_params else _IMPLIED_TARGETS.get(tuple(parts[: depth + 1]))
                node = node[part]
            elif any(path[: depth + 1] == tuple(parts[: depth + 1]) for path in [*_IMPLIED_TARGETS, *_OPEN_MAPPINGS]):
                node, receiver = {}, _IMPLIED_TARGETS.get(tuple(parts[: depth + 1]))  # e.g. lightning.trainer, not in the file
            elif receiver is not None:
                _refuse_unknown(item, receiver, where, part, node if isinstance(node, dict) else ())
                break  # a new key the class takes: what lies below it is the class's business
            elif part == "params" and isinstance(node, dict) and isinstance(node.get("target"), str):
                if depth + 1 < len(parts):
                    _refuse_unknown(item, node["target"], f"{where}.params", parts[depth + 1], ())
                break
            else:
                existing = list(node) if isinstance(node, dict) else []
                raise ConfigError(f"config override '{item}': no key '{part}' under {where}{_closest(part, existing)}")


def check_target_params(config: DictConfig, flag: str = "--base") -> None:
    """Every ``params`` key of every ``target`` node (and of the implied Lightning nodes) must be taken by its class."""

    def check_keys(target: str, params: dict, path: tuple[str, ...]) -> None:
        accepted = accepted_keys(target)
        for key in params if accepted is not None else ():
            if key not in accepted:
                raise ConfigError(
                    f"{flag}: {'.'.join(path)}.{key} is not a parameter of {target.rsplit('.', 1)[-1]}"
                    f"{_closest(str(key), accepted)}; fix or remove the key"
                )

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("target"), str) and isinstance(node.get("params"), dict):
                check_keys(node["target"], node["params"], path + ("params",))
            if path in _IMPLIED_TARGETS and node:
                check_keys(_IMPLIED_TARGETS[path], node, path)
            for key, value in node.items():
                visit(value, path + (str(key),))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                visit(value, path + (str(i),))

    visit(OmegaConf.to_container(config, resolve=False), ())
