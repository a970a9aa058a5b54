"""Training settings declared once: a dataclass field carries its default, its help text, its command-line flag and
how it enters a run's resume fingerprint.

:func:`setting` is used by :class:`~.config.TrainConfig`, :class:`~.prompts.PromptConfig` and
:class:`~.losses.LossWeights`; ``python -m training.fit`` builds its options from these fields
(:func:`training.finetune.presets.add_setting_arguments`), so a default is written in one place only.

Fingerprint policy (``fingerprint=``): a resumed run must have the same settings as the run it continues, so the
fingerprint hashes every setting that changes what is trained, except

- ``"never"``: settings that may change between a run and its resumption (epochs, time budget, device, caches);
- ``"unless_default"``: settings added after runs were already saved; left out while they hold their default, so
  the runs saved before the setting existed (which trained with that default) keep their fingerprint and resume.
  Every new setting is declared this way.

``head=`` names the trainer head a setting belongs to: it is left out of the fingerprint of runs of other heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

ALWAYS, NEVER, UNLESS_DEFAULT = "always", "never", "unless_default"


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,  # noqa: A002
            parse: Callable[[str], Any] | None = None, shown: str | None = None, choices: tuple | None = None,
            off_flag: str | None = None, off_help: str = "", group: str | None = None, fingerprint: str = ALWAYS,
            head: str | None = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its documentation.

    ``flag``: the command-line option (``None``: not on the command line); ``parse``: turns the option's text into
    the field's value (default: the type of ``default``); ``shown``: the default as the help text writes it;
    ``off_flag`` / ``off_help``: for a bool field, a flag that sets it False; ``choices``: the allowed option words;
    ``group``: the section of the command-line help.
    """
    if fingerprint not in (ALWAYS, NEVER, UNLESS_DEFAULT):
        raise ValueError(f"unknown fingerprint policy {fingerprint!r}")
    metadata = dict(help=help, flag=flag, parse=parse, shown=shown, choices=choices, off_flag=off_flag,
                    off_help=off_help, group=group, fingerprint=fingerprint, head=head)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def fingerprint_dict(obj: Any, head: str | None) -> dict:
    """The settings of ``obj`` (a dataclass of :func:`setting` fields, nested ones included) that a resumed run
    must share, as a JSON-ready dict (see the module docstring for what is left out)."""
    out: dict = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        policy = f.metadata.get("fingerprint", ALWAYS)
        owner = f.metadata.get("head")
        if policy == NEVER or (owner is not None and owner != head):
            continue
        if policy == UNLESS_DEFAULT and value == field_default(f):
            continue
        if dataclasses.is_dataclass(value):
            value = fingerprint_dict(value, head)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _option_type(parse: Callable | None, default: Any) -> Callable | None:
    if parse is None:
        return None if default is None or isinstance(default, (bool, tuple)) else type(default)
    return parse if isinstance(parse, type) else str  # other parsers run later, with the project's error messages


def add_arguments(parser, classes, groups: dict[str, Any]) -> None:
    """Add every :func:`setting` field of ``classes`` that has a flag to ``parser`` (argparse), in the section
    ``groups[field's group]``; the help text ends with the field's default. An option left out is ``None`` in
    the parsed namespace, so a preset or the field's default applies (:func:`given_values`)."""
    for cls in classes:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not (meta.get("flag") or meta.get("off_flag")):
                continue
            target = groups.get(meta.get("group"), parser)
            default = field_default(f)
            flags = meta["flag"] if isinstance(meta.get("flag"), tuple) else (meta.get("flag"),)
            if isinstance(default, bool):
                if flags[0]:
                    target.add_argument(*flags, dest=f.name, action="store_true", default=None,
                                        help=meta["help"] + (" (default)" if default else ""))
                if meta.get("off_flag"):
                    target.add_argument(meta["off_flag"], dest=f.name, action="store_false", default=None,
                                        help=(meta.get("off_help") or f"not: {meta['help']}") + ("" if default else
                                                                                                " (default)"))
                continue
            shown = meta.get("shown") or (default if default is not None else "none")
            metavar = None if meta.get("choices") else flags[0].lstrip("-").replace("-", "_").upper()
            target.add_argument(*flags, dest=f.name, default=None, type=_option_type(meta.get("parse"), default),
                                choices=meta.get("choices"), metavar=metavar, help=f"{meta['help']} (default {shown})")


def given_values(args, classes) -> dict:
    """The settings given on the command line (``None`` = left out), parsed into field values."""
    out = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not (meta.get("flag") or meta.get("off_flag")):
                continue
            value = getattr(args, f.name, None)
            if value is None:
                continue
            parse = meta.get("parse")
            if parse is not None and not isinstance(parse, type):
                value = parse(value)
            out[f.name] = value
    return out
