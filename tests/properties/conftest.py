"""Hypothesis profiles of the property tests.

``ci`` (chosen when ``CI`` is set, as ``.ci/run`` and CI services do): derandomized, so a
run is reproducible and cannot fail by chance, 200 examples per property, no deadline (a
loaded 2-core machine must not turn a slow example into a failure) and no example
database. ``dev`` (the default elsewhere): random exploration, the same budget, failures
remembered in ``.hypothesis/`` so they are tried first next time.
``HYPOTHESIS_PROFILE=thorough`` runs 5000 random examples per property.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=200, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.register_profile("thorough", max_examples=5000, **_COMMON)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)
