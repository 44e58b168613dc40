"""Command-line flags derived from the config dataclasses, plus ``--config run.toml``.

Why derived and not written out: every node widget is a field of :class:`~lora2.config.LoRA2Config`,
:class:`~lora2.train.TrainConfig`, :class:`~lora2.dataset_spec.DatasetSpec` or
:class:`~lora2.validation.ValidationConfig`, and those dataclasses already hold the default, the type
and (in the attribute docstring) the explanation of each. A flag list kept by hand would drift from
them the first time a field is added; this one cannot. Names are the field names with dashes
(``init_rank`` -> ``--init-rank``); :data:`RENAMES` settles the few fields two dataclasses share.

Precedence: a dataclass default < the ``--config`` TOML file < a flag given on the command line. The
TOML file is flat, one key per flag with underscores (``init_rank = 8``), so ``--help`` documents it too.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from ..lora2.config import LoRA2Config
from ..lora2.dataset_spec import DatasetSpec
from ..lora2.errors import LoRA2Error
from ..lora2.train import TrainConfig
from ..lora2.validation import ValidationConfig
from .options import RunOptions


@dataclass(frozen=True)
class Group:
    """One config dataclass as a group of flags."""

    title: str
    cls: type
    prefix: str = ""
    """Prepended to every flag of the group (``validate_`` -> ``--validate-every``)."""
    skip: tuple[str, ...] = ()
    """Fields the CLI sets itself (or that only mean something inside ComfyUI)."""


GROUPS: tuple[Group, ...] = (
    Group("input and output", RunOptions),
    Group("training", TrainConfig),
    Group("adapter (LoRA² / fixed rank)", LoRA2Config, skip=("seed",)),
    Group("dataset preprocessing", DatasetSpec),
    # sampler/scheduler are ComfyUI sampler names (the CLI samples with the pipeline's own scheduler);
    # run_name is the node's output sub-folder (the CLI writes into --output)
    Group("validation samples", ValidationConfig, prefix="validate_", skip=("sampler", "scheduler", "run_name")),
)
"""Every dataclass whose fields become flags. ``LoRA2Config.seed`` follows ``--seed`` (the node's one seed widget)."""

RENAMES: dict[tuple[type, str], str] = {
    (LoRA2Config, "dtype"): "adapter_dtype",
    (DatasetSpec, "seed"): "augment_seed",
}
"""Fields whose plain name another group already uses: ``TrainConfig.dtype`` is ``--dtype`` (compute),
the adapter's storage dtype is ``--adapter-dtype``; ``TrainConfig.seed`` is ``--seed``, the dataset's
augmentation seed ``--augment-seed``."""


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string right under each field), first paragraph."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                text = str(after.value.value).strip().split("\n\n")[0]
                docs[node.target.id] = " ".join(text.split()).replace("%", "%%")
    return docs


@dataclass(frozen=True)
class Flag:
    """One flag: where its value goes and how to read it."""

    dest: str
    """Namespace attribute and TOML key."""
    cls: type
    field: str
    kind: type
    """``bool``, ``int``, ``float``, ``str`` or ``tuple`` (a list: several values after the flag)."""
    default: Any
    item: type = str
    """The type of a tuple's items (``tuple[int, ...]`` -> ``int``)."""

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _kind(annotation: Any) -> tuple[type, type]:
    """The plain type of a field annotation and of its items (``str | None`` -> ``str``, ``tuple[int, ...]`` ->
    ``tuple`` of ``int``)."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple, typing.get_args(hint)[0]
    if hint in (bool, int, float, str):
        return hint, str
    raise TypeError(f"no flag type for annotation {annotation!r}")


def config_flags(groups: Sequence[Group] = GROUPS) -> list[Flag]:
    """Every flag derived from ``groups``, in group order."""
    flags = []
    for group in groups:
        hints = typing.get_type_hints(group.cls)
        for f in dataclasses.fields(group.cls):
            if f.name in group.skip:
                continue
            dest = RENAMES.get((group.cls, f.name), group.prefix + f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            kind, item = _kind(hints[f.name])
            flags.append(Flag(dest, group.cls, f.name, kind, default, item))
    return flags


def add_flag(parser: argparse._ActionsContainer, flag: Flag, help_text: str) -> None:
    """Add one derived flag; its default is left out (SUPPRESS) so that a TOML value can sit under it."""
    shown = " ".join(map(str, flag.default)) if flag.kind is tuple else flag.default
    help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
    if flag.kind is bool:
        parser.add_argument(
            flag.option,
            dest=flag.dest,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=help_text,
        )
        return
    if flag.kind is tuple:  # a list: --module-types linear conv2d (prompts hold commas, so no comma lists)
        parser.add_argument(
            flag.option, dest=flag.dest, nargs="+", metavar="TEXT", default=argparse.SUPPRESS, help=help_text
        )
        return
    kinds: dict[type, Callable[[str], Any]] = {int: int, float: float, str: str}
    metavar = flag.kind.__name__.upper()
    parser.add_argument(
        flag.option, dest=flag.dest, type=kinds[flag.kind], metavar=metavar, default=argparse.SUPPRESS, help=help_text
    )


def add_config_flags(parser: argparse.ArgumentParser, groups: Sequence[Group] = GROUPS) -> list[Flag]:
    """Add every dataclass-derived flag to ``parser`` in one argument group per dataclass."""
    flags = config_flags(groups)
    for group in groups:
        docs = field_docs(group.cls)
        section = parser.add_argument_group(group.title)
        for flag in flags:
            if flag.cls is group.cls:
                add_flag(section, flag, docs.get(flag.field, ""))
    return flags


def read_toml(path: Path) -> dict[str, Any]:
    """The flat table of a ``--config`` file (a clear error for a missing or broken file)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as error:
        raise LoRA2Error(f"config file '{path}' does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise LoRA2Error(f"config file '{path}' is not valid TOML: {error}") from error


def coerce(flag: Flag, value: Any, where: str) -> Any:
    """A TOML value as the flag's type; TOML already types it, so only safe widenings are allowed."""
    flag_kind = flag.kind
    if flag_kind is tuple:
        items = value if isinstance(value, list) else [value]
        if all(type(v) is flag.item for v in items):
            return tuple(items)
        raise LoRA2Error(f"{where} must be a list of {flag.item.__name__}, got {value!r}")
    if flag_kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if flag_kind is bool and isinstance(value, bool):
        return value
    if flag_kind in (int, str) and type(value) is flag_kind:
        return value
    if flag_kind is float and isinstance(value, float):
        return value
    raise LoRA2Error(f"{where} must be {flag_kind.__name__}, got {type(value).__name__} {value!r}")


def merge(given: argparse.Namespace, toml_values: dict[str, Any], flags: Sequence[Flag], source: str) -> dict[str, Any]:
    """``toml_values`` under the flags given on the command line; unknown TOML keys are refused."""
    given = {key: tuple(value) if isinstance(value, list) else value for key, value in vars(given).items()}
    known = {flag.dest: flag for flag in flags}
    unknown = sorted(set(toml_values) - set(known))
    if unknown:
        raise LoRA2Error(
            f"{source} has unknown keys {unknown}; keys are the flag names with underscores "
            f"(see lora2-train --help), e.g. {sorted(known)[:6]}"
        )
    values = {key: coerce(known[key], value, f"{source}: {key}") for key, value in toml_values.items()}
    values.update({key: value for key, value in given.items() if key in known})
    return values


@dataclass
class Configs:
    """The config dataclasses a run is built from."""

    options: RunOptions
    lora2: LoRA2Config
    train: TrainConfig
    dataset: DatasetSpec
    validation: ValidationConfig


def dataclass_kwargs(values: dict[str, Any], flags: Sequence[Flag]) -> dict[type, dict[str, Any]]:
    """Merged flag values sorted into keyword arguments per dataclass (fields not given keep their default)."""
    kwargs: dict[type, dict[str, Any]] = {}
    for flag in flags:
        kwargs.setdefault(flag.cls, {})
        if flag.dest in values:
            kwargs[flag.cls][flag.field] = values[flag.dest]
    return kwargs


def build_configs(values: dict[str, Any], flags: Sequence[Flag]) -> Configs:
    """Construct every dataclass from merged flag values (each validates itself: bad values are LoRA2Errors)."""
    kwargs = dataclass_kwargs(values, flags)
    train = TrainConfig(**kwargs[TrainConfig])
    lora2 = LoRA2Config(**kwargs[LoRA2Config], seed=train.seed)
    options = RunOptions(**kwargs[RunOptions])
    dataset, validation = DatasetSpec(**kwargs[DatasetSpec]), ValidationConfig(**kwargs[ValidationConfig])
    return Configs(options, lora2, train, dataset, validation)
