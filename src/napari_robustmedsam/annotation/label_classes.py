"""Label values and class names: "this object is label 2 = oedema".

A commit normally takes the next free id (one object per id). Choosing a label value (or a class name) makes
the commit write that value instead, so several objects can share a class, and a labels file made elsewhere
can be continued with its own values. :class:`LabelClasses` keeps the value <-> name table of a session; the
commit records the class name in the object's record (``info["class"]``), and the table goes into the
``prompts.json`` beside the labels.

Accepted choices: ``""`` (next free id), ``"2"``, ``"oedema"`` (its value, or a new value after the largest
known one), ``"2=oedema"`` / ``"2: oedema"`` (names value 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserFacingError

_PAIR = re.compile(r"^\s*(\d+)\s*[=:]\s*(.+?)\s*$")


@dataclass(frozen=True)
class LabelChoice:
    value: int | None  # None: the next free id
    name: str | None = None


@dataclass
class LabelClasses:
    names: dict[int, str] = field(default_factory=dict)

    def name_of(self, value: int) -> str | None:
        return self.names.get(int(value))

    def value_of(self, name: str) -> int | None:
        key = name.strip().lower()
        for value, known in self.names.items():
            if known.lower() == key:
                return value
        return None

    def choose(self, text: str | int | None, labels: np.ndarray | None = None) -> LabelChoice:
        """Read a choice (see the module doc); a new name gets the value after every value in use."""
        if text is None or (isinstance(text, str) and not text.strip()):
            return LabelChoice(None)
        if isinstance(text, (int, np.integer)):
            return LabelChoice(self._check_value(int(text)), self.name_of(int(text)))
        text = str(text).strip()
        pair = _PAIR.match(text)
        if pair:
            value = self._check_value(int(pair.group(1)))
            name = pair.group(2)
            other = self.value_of(name)
            if other is not None and other != value:
                raise UserFacingError(f"class '{name}' is already label {other}; choose another name or value {other}")
            self.names[value] = name
            return LabelChoice(value, name)
        if text.isdigit():
            value = self._check_value(int(text))
            return LabelChoice(value, self.name_of(value))
        value = self.value_of(text)
        if value is None:
            top = int(np.asarray(labels).max(initial=0)) if labels is not None else 0
            value = max([top, *self.names], default=0) + 1
            self.names[value] = text
        return LabelChoice(value, self.names[value])

    @staticmethod
    def _check_value(value: int) -> int:
        if not 1 <= value <= np.iinfo(np.uint32).max:
            raise UserFacingError(f"label value {value} is not usable: label values run from 1 (0 is background)")
        return value

    def to_json(self) -> dict[str, str]:
        return {str(k): v for k, v in sorted(self.names.items())}

    @classmethod
    def from_json(cls, data: dict | None) -> "LabelClasses":
        return cls({int(k): str(v) for k, v in (data or {}).items()})


def commit_as(session, choice: LabelChoice, overwrite: bool = False, info: dict | None = None):
    """Commit the session's current object under the chosen value (and record its class name)."""
    details = dict(info or {})
    if choice.name:
        details["class"] = choice.name
    return session.commit(overwrite=overwrite, label_id=choice.value, info=details)


def mask_prompt_fn(preprocessing: str, plane_shape: tuple[int, int]):
    """``logits_for(z, mask)`` for :meth:`AnnotationSession.start_from_label`: a label's mask as the decoder's
    mask prompt (low-resolution logits in the model's frame, as a corrective click feeds back its previous ones).

    The frame depends only on the slice size and the preprocessing, so no embedding is needed.
    """
    from ..engine.preprocessing import preprocess

    _, frame = preprocess(np.zeros(tuple(int(s) for s in plane_shape), np.float32), preprocessing)

    def logits_for(z: int, mask: np.ndarray):
        return frame.mask_to_low_res(mask)

    return logits_for
