"""Refinement as a pluggable stage: ``refine.method`` picks a registered refiner (docs/refiners.md).

``irn`` (default): IRN's boundary-aware AffinityNet; ``psa``: PSA's original AffinityNet;
``crf``: a dense CRF of the CAMs, no training. Each has its own typed config section.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from wsss.refine.base import REFINERS, Refiner, TrialImages, register_refiner
from wsss.refine.crf import CrfSpec
from wsss.refine.irn import IrnSpec
from wsss.refine.psa import PsaSpec
from wsss.regions import dense_crf
from wsss.spec import Spec

__all__ = ["REFINERS", "RefineSpec", "Refiner", "TrialImages", "create_refiner",
           "register_refiner"]


class RefineSpec(Spec):
    """The ``refine`` config section: the method, and every method's own settings."""

    method: str = Field("irn", description="a registered refiner: irn, psa or crf")
    irn: IrnSpec = Field(default_factory=IrnSpec)
    psa: PsaSpec = Field(default_factory=PsaSpec)
    crf: CrfSpec = Field(default_factory=CrfSpec)

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        if method not in REFINERS:
            raise ValueError(f"not a registered refiner; choose one of {sorted(REFINERS)}")
        return method

    @property
    def section(self) -> Spec:
        """The chosen method's settings."""
        return getattr(self, self.method)

    @property
    def epochs(self) -> int:
        """Training epochs of the chosen method (0: it does not train)."""
        return getattr(self.section, "epochs", 0)

    @property
    def reports(self) -> int:
        """How often a trial reports: after every epoch, or once for a method that does not
        train. What early stopping, progress and promotion count in."""
        return max(1, self.epochs)

    @property
    def needs_features(self) -> bool:
        """Whether stage 0 must store frozen features for this method (the trained ones)."""
        return self.epochs > 0


    def check_available(self) -> None:
        """A `UserError` now, before any work, when the method needs the missing ``[crf]``
        extra (``crf``, or a trained method's ``crf`` label cleaning)."""
        if self.method == "crf":
            dense_crf("refine.method crf")
        elif getattr(self.section, "crf", False):
            dense_crf(f"refine.{self.method}.crf")


def create_refiner(spec: RefineSpec, images: TrialImages) -> Refiner:
    return REFINERS[spec.method](images, spec.section)
