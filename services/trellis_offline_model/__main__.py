"""``python -m trellis_offline_model`` / ``trellis-offline-model``: the rule model as a process.

Serves until SIGTERM or SIGINT. Point the planner at it with
``OPENAI_BASE_URL=http://127.0.0.1:8400/v1`` (the planner's default).
"""

from __future__ import annotations

import asyncio

from trellis.runtime.logs import get_logger, setup_logging
from trellis.runtime.server import wait_for_signal
from trellis.runtime.settings import load_settings
from trellis_offline_model.server import start_offline_model
from trellis_offline_model.settings import OfflineModelSettings

log = get_logger(__name__)


def main() -> None:
    settings = load_settings(OfflineModelSettings, "trellis-offline-model")
    setup_logging("info", service="offline-model")

    async def serve() -> None:
        running = await start_offline_model(
            settings.host, settings.port, settings.delay_ms, settings.line_delay_ms
        )
        log.info("ready", base_url=running.base_url)
        await wait_for_signal()
        await running.stop()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
