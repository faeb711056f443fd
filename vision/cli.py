"""What the vision CLIs (`python -m vision.train`, `python -m vision.evaluate`) share: flags built from dataclass
fields, so defaults, choices and help have one home (ReportConfig, GenerationConfig, TrainConfig), the help
formatter that shows every default, path / device flag types, and how errors reach the user.

    add_fields(parser, ReportConfig, "report", skip={"generation"})   # --lm-mode {frozen,lora,full}, ...
    ReportConfig(**fields_of(args, "report"))
    run_cli(parser, handler)   # user errors: `prog: error: ...`, exit 2, no traceback
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
import typing
from pathlib import Path

import torch

from stablelm.cli import HelpFormatter, report_user_errors

from .pipeline import ValidationFailed

UNSET_HELP = "default: the checkpoint's"


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)


def path(text: str) -> Path:
    """A path flag, `~` expanded."""
    return Path(text).expanduser()


def device(text: str) -> torch.device:
    """A torch device flag that exists on this machine."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_cli(parser: argparse.ArgumentParser, handler) -> None:
    """handler(args, parser) for the command line, then exit: a user error (a bad value, a missing or unreadable
    file, a refused checkpoint) prints `prog: error: ...` and exits 2; a failed validation prints its cause's
    traceback, then `prog: error: ...` saying where the epoch is saved, and exits 1."""
    args = parser.parse_args()
    try:
        report_user_errors(handler, args, parser)
    except ValidationFailed as e:
        traceback.print_exception(e.__cause__)
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    sys.exit(0)


def _parse_early_stopping(text: str) -> bool | str:
    return {"true": True, "false": False}.get(text.lower(), text)


def _parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq or not name.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=NUMBER (e.g. BLEU_4=0.5,CIDEr=0.5)")
    return weights


def _format_weights(weights: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in weights.items())


def add_fields(ap, cls, tag: str, *, skip=(), defaults=None, rename=None, unset: bool = False) -> None:
    """One --flag per field of dataclass `cls` (underscores become dashes; `rename` maps a field to another flag
    name). Defaults come from `defaults` (an instance) or the field's own; `choices` and `help` from the field's
    metadata. With `unset`, flags left out of the command line are left out of `fields_of` (overrides)."""
    hints = typing.get_type_hints(cls)
    rename = rename or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()
        kind = hints[f.name]
        kw = {"choices": f.metadata.get("choices")}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == bool | str:  # GenerationConfig.early_stopping: False, True or "never"
            kw.update(type=_parse_early_stopping, metavar="{false,true,never}")
        elif kind == dict[str, float]:
            kw.update(type=_parse_weights, metavar="NAME=W,...")
            default = default if unset else _format_weights(default)
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
            if len(args) != 1 or args[0] not in (int, float, str):
                raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {kind}")
            kw.update(type=args[0], metavar=f.name.upper() if kw["choices"] is None else None)
        help_text = f.metadata.get("help", f"{cls.__name__}.{f.name}")
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        ap.add_argument(flag, dest=f"{tag}.{f.name}", default=argparse.SUPPRESS if unset else default,
                        help=f"{help_text} ({UNSET_HELP})" if unset else help_text,
                        **{k: v for k, v in kw.items() if v is not None})


def fields_of(args: argparse.Namespace, tag: str) -> dict:
    """The values add_fields(..., tag) parsed, by field name."""
    prefix = tag + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
