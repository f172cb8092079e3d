"""The configuration table of the README, generated from the settings classes.

``python -m trellis_cli.config_table`` prints it; a test checks that README.md holds
exactly this table, so documented variables cannot drift from the code.
"""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings

from trellis.runtime.settings import ServiceSettings, env_name
from trellis_cache.settings import CacheSettings
from trellis_costs.settings import CostsSettings
from trellis_executor.settings import ExecutorSettings
from trellis_offline_model.settings import OfflineModelSettings
from trellis_planner.settings import PlannerSettings
from trellis_toolgateway.settings import GatewaySettings

SERVICES: dict[str, type[BaseSettings]] = {
    "executor": ExecutorSettings,
    "planner": PlannerSettings,
    "toolgateway": GatewaySettings,
    "cache": CacheSettings,
    "costs": CostsSettings,
    "offline-model": OfflineModelSettings,
}


def _default(cls: type[BaseSettings], field: str) -> str:
    value = cls.model_fields[field].default
    if isinstance(value, SecretStr):
        return "(secret)"
    return "" if value is None else f"`{value}`"


def rows() -> list[tuple[str, str, str, str]]:
    """(variable, default, services, meaning), shared variables first."""
    out = []
    for field, info in ServiceSettings.model_fields.items():
        overridden = [
            n
            for n, c in SERVICES.items()
            if issubclass(c, ServiceSettings) and c.model_fields[field].default != info.default
        ]
        default = _default(ServiceSettings, field)
        if overridden:
            default = "per service: " + ", ".join(
                f"{n} {_default(SERVICES[n], field)}" for n in overridden
            )
        out.append((env_name(ServiceSettings, field), default, "all", info.description or ""))
    for name, cls in SERVICES.items():
        for field, info in cls.model_fields.items():
            if issubclass(cls, ServiceSettings) and field in ServiceSettings.model_fields:
                continue
            out.append((env_name(cls, field), _default(cls, field), name, info.description or ""))
    return out


def markdown() -> str:
    lines = ["| variable | default | service | meaning |", "|---|---|---|---|"]
    lines += [f"| `{v}` | {d} | {s} | {m} |" for v, d, s, m in rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
