"""The builder's shared option grammar (docs/cli.md): one name per concept, old spellings kept as
hidden, deprecated aliases that still work and say what to write instead."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, overload

import typer

INPUT_SHAPE_HELP = ("Input shapes, repeatable: e.g. 1x3x224x224, or --input-shape input_ids=1x128:int64 "
                    "--input-shape attention_mask=1x128:int64 (a comma list also works; NAME@N keeps an axis dynamic).")


def InputShapeOption(help_text: str = INPUT_SHAPE_HELP) -> Any:  # noqa: N802 - reads like typer.Option
    """``--input-shape/-s``, repeatable: every value is merged (see :func:`merged_input_shapes`)."""
    return typer.Option(None, "--input-shape", "-s", help=help_text)


def ProfileOption(help_text: str = "Device profile (`builder profiles list`).") -> Any:  # noqa: N802
    """``--profile/-p NAME``: a device profile, never a device id (that is ``--device``). Optional at
    the Typer level so a deprecated alias can stand in; :func:`resolve_alias` requires one of them."""
    return typer.Option(None, "--profile", "-p", help=help_text)


def HiddenAlias(*names: str) -> Any:  # noqa: N802
    """An old spelling that still works but is no longer shown in ``--help``."""
    return typer.Option(None, *names, hidden=True)


def merged_input_shapes(values: Optional[Sequence[str]]) -> Optional[str]:
    """All ``--input-shape`` values as one comma list (the loader's format); ``None`` when none given."""
    parts = [v.strip().strip(",") for v in (values or ()) if v and v.strip().strip(",")]
    return ",".join(parts) if parts else None


def deprecated(old: str, new: str) -> None:
    """One line on stderr for a deprecated spelling; the command goes on with the new meaning."""
    print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)


@overload
def resolve_alias(value: Optional[str], alias_value: Optional[str], new: str, old: str,
                  required: Literal[True] = ...) -> str: ...
@overload
def resolve_alias(value: Optional[str], alias_value: Optional[str], new: str, old: str,
                  required: Literal[False]) -> Optional[str]: ...
def resolve_alias(value: Optional[str], alias_value: Optional[str], new: str, old: str,
                  required: bool = True) -> Optional[str]:
    """The value of ``new``, else of its deprecated alias ``old`` (with a warning); a one-line
    error when neither is given but one is required, or both disagree."""
    from builder.errors import UsageError

    if alias_value is not None:
        deprecated(old, new)
        if value is not None and value != alias_value:
            raise UsageError(f"{new} {value} and {old} {alias_value} disagree; give {new} only")
        value = value if value is not None else alias_value
    if value is None and required:
        raise UsageError(f"missing option {new}")
    return value


def duration_or_seconds(text: str, old_seconds: Optional[float], option: str) -> float:
    """``--timeout 15m`` style durations (``0s`` allowed); the old ``--timeout-s N`` still wins
    when given, with a deprecation warning."""
    from builder.search.objectives import parse_duration_s

    if old_seconds is not None:
        deprecated(f"{option}-s N", f"{option} Ns (or 10m, 2h)")
        return float(old_seconds)
    if text.strip().lower() in ("0", "0s"):  # "no soak" is a valid duration here
        return 0.0
    return parse_duration_s(text.strip(), option)


def refuse_existing(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing ``path`` unless ``--force`` was given (no silent overwrite)."""
    from builder.errors import UsageError

    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it or choose another --out")


STORE_HELP = ("Fleet store: a postgresql://user@host/db URL (several `builder serve` workers share it: docs/scale.md); "
              "default $EDGEFLEET_STORE, else the SQLite file in the data dir.")


def StoreOption() -> Any:  # noqa: N802 - reads like typer.Option
    """``--store URL`` (or ``$EDGEFLEET_STORE``): where the fleet store is, on every command that opens it."""
    return typer.Option(None, "--store", envvar="EDGEFLEET_STORE", show_envvar=False, help=STORE_HELP)
