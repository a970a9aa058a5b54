"""The click path's settings as one object, with named instances.

Why: the local corrections, the click guard, its reach and the click refinement were chosen one by one, and each
entry point (the annotator, ``training.evaluate``, ``benchmarks``) set them from its own flags and defaults. A
:class:`ClickPolicy` holds all four; ``CLICK_POLICIES["annotator"]`` is what the annotator does by default (built from
the defaults in :mod:`.prompt_decoding`, the one place they are set), ``CLICK_POLICIES["papers"]`` the seed papers'
protocol (the model's whole mask at every click). ``python -m training.evaluate --policy annotator`` evaluates
exactly the annotator's click path; single flags override single settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..engine.click_guard import EdgeReach
from ..engine.click_refinement import REFINEMENT_METHODS
from .prompt_decoding import (
    CLICK_GUARD_MODES,
    DEFAULT_CLICK_GUARD,
    DEFAULT_CLICK_GUARD_REACH,
    DEFAULT_CLICK_REFINEMENT,
    DEFAULT_LOCAL_CORRECTIONS,
    LOCAL_CORRECTION_MODES,
    REFINED_CLICK_GUARD_REACH,
)


@dataclass(frozen=True)
class ClickPolicy:
    """What happens to a corrective click after the model (see :func:`.prompt_decoding.segment_slice`).

    ``refined_click_guard_reach``: the guard's reach while the click refinement is on (the annotator bounds every
    click then); None: ``click_guard_reach`` whatever the refinement. :attr:`guard_reach` is the one that acts."""

    local_corrections: str = "off"  # LOCAL_CORRECTION_MODES
    click_guard: str = "off"  # CLICK_GUARD_MODES
    click_guard_reach: EdgeReach | None = None
    click_refinement: str = "off"  # REFINEMENT_METHODS
    refined_click_guard_reach: EdgeReach | None = None

    def __post_init__(self):
        if self.local_corrections not in LOCAL_CORRECTION_MODES:
            raise ValueError(f"local corrections {self.local_corrections!r}: use one of {', '.join(LOCAL_CORRECTION_MODES)}")
        if self.click_guard not in CLICK_GUARD_MODES:
            raise ValueError(f"click guard {self.click_guard!r}: use one of {', '.join(CLICK_GUARD_MODES)}")
        if self.click_refinement not in REFINEMENT_METHODS:
            raise ValueError(f"click refinement {self.click_refinement!r}: use one of {', '.join(REFINEMENT_METHODS)}")

    def with_overrides(self, **changes) -> "ClickPolicy":
        """A copy with the given settings changed (None values keep this policy's)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def guard_reach(self) -> EdgeReach | None:
        """The guard's reach that acts with this policy's click refinement."""
        if self.click_refinement != "off" and self.refined_click_guard_reach is not None:
            return self.refined_click_guard_reach
        return self.click_guard_reach

    def with_guard_reach(self, reach: EdgeReach | None) -> "ClickPolicy":
        """A copy whose guard reach is ``reach`` with and without the refinement (an explicit choice)."""
        return replace(self, click_guard_reach=reach, refined_click_guard_reach=None)

    def segment_kwargs(self) -> dict:
        """The keyword arguments of :func:`.prompt_decoding.segment_slice` this policy sets."""
        return dict(local_corrections=self.local_corrections, click_guard=self.click_guard,
                    click_guard_reach=self.guard_reach, click_refinement=self.click_refinement)

    @property
    def key(self) -> str:
        """A short, stable text of what the policy does (run records; two policies with one key behave the same)."""
        acting = self.guard_reach
        reach = "none" if acting is None else f"{acting.factor:g}/{acting.scope}"
        return (f"local={self.local_corrections.replace(' ', '-')} guard={self.click_guard.replace(' ', '-')} "
                f"reach={reach} refine={self.click_refinement}")


def annotator_click_policy(local_corrections: str, click_guard: str, click_refinement: str) -> ClickPolicy:
    """The annotator's policy with the user's three panel choices; the guard's reach follows the refinement as
    :attr:`ClickPolicy.guard_reach` says (every click bounded while a refinement is on)."""
    return CLICK_POLICIES["annotator"].with_overrides(local_corrections=local_corrections, click_guard=click_guard,
                                                      click_refinement=click_refinement)


CLICK_POLICIES: dict[str, ClickPolicy] = {
    "annotator": ClickPolicy(DEFAULT_LOCAL_CORRECTIONS, DEFAULT_CLICK_GUARD, DEFAULT_CLICK_GUARD_REACH,
                             DEFAULT_CLICK_REFINEMENT, REFINED_CLICK_GUARD_REACH),
    "papers": ClickPolicy(),
}


def click_policy(name: str) -> ClickPolicy:
    """The named policy; a clear error naming the valid ones."""
    try:
        return CLICK_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown click policy {name!r}: use one of {', '.join(CLICK_POLICIES)}") from None
