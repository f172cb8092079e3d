"""Hypothesis profiles of the property tests.

``ci`` (the default) keeps ``make test`` quick: 200 examples per property, no deadline
(a loaded 2-core machine must not turn a slow example into a failure), and no example
database written into the checkout (a failure prints its reproduction blob instead).
``HYPOTHESIS_PROFILE=thorough`` runs 5000 examples per property.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("thorough", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
