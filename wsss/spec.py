"""Base of the typed parameter blocks each pipeline stage declares (the config's sections).

A stage owns its parameters (``ClassifierSpec`` beside the classifier, ``CamSpec`` beside CAM
extraction); the search config composes them, so no field is declared twice. Unknown keys are
errors, so a typo never silently falls back to a default.
"""

from pydantic import BaseModel, ConfigDict


class Spec(BaseModel):
    """Strict, validated parameter block."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
