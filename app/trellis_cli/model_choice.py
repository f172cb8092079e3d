"""Which model ``trellis demo`` (``make run``) plans with, and the line that says so.

The planner's own variables decide, as in a deployment: ``OPENAI_BASE_URL`` names an
OpenAI-compatible endpoint (then the demo starts no offline model), ``OPENAI_API_KEY``
its key, ``TRELLIS_MODEL`` the model. Without ``OPENAI_BASE_URL`` the demo uses the
offline rules model; a ``TRELLIS_MODEL`` other than it, with no endpoint to serve it, is a
usage error rather than a silent switch to the offline model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trellis.runtime.redact import redact_url
from trellis_planner.settings import OFFLINE_MODEL


class ModelChoiceError(ValueError):
    """The environment asks for a model the demo cannot reach; one line says why."""


@dataclass(frozen=True)
class ModelChoice:
    model: str
    #: The endpoint; None: the offline model the demo starts.
    base_url: str | None

    def describe(self) -> str:
        if self.base_url is None:
            return (
                f"model: {self.model} (the offline rules model: rule-based, not an LLM; set"
                " OPENAI_BASE_URL, OPENAI_API_KEY and TRELLIS_MODEL to use a real one)"
            )
        return f"model: {self.model} at {redact_url(self.base_url)} (OPENAI_BASE_URL)"


def model_choice(env: Mapping[str, str]) -> ModelChoice:
    """The model and endpoint ``env`` names; ``ModelChoiceError`` when it cannot be used."""
    base_url = env.get("OPENAI_BASE_URL", "").strip() or None
    model = env.get("TRELLIS_MODEL", "").strip() or OFFLINE_MODEL
    if base_url is None and model != OFFLINE_MODEL:
        raise ModelChoiceError(
            f"TRELLIS_MODEL={model} needs OPENAI_BASE_URL (and OPENAI_API_KEY) naming an"
            f" endpoint that serves it, e.g. OPENAI_BASE_URL=https://api.openai.com/v1;"
            f" without them the demo uses the offline model {OFFLINE_MODEL}"
        )
    return ModelChoice(model, base_url)
