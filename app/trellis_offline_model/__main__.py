"""``python -m trellis_offline_model`` / ``trellis-offline-model``: the rule model as a process.

Serves until SIGTERM or SIGINT. Point the planner at it with
``OPENAI_BASE_URL=http://127.0.0.1:8400/v1`` (the planner's default). A busy port stops it
with one line naming ``TRELLIS_OFFLINE_MODEL_PORT``, exit code 2, like every service.
"""

from __future__ import annotations

import asyncio

from trellis.runtime.logs import get_logger, setup_logging
from trellis.runtime.ports import check_port
from trellis.runtime.server import wait_for_signal
from trellis.runtime.settings import env_name, load_settings, startup_errors_exit
from trellis_offline_model.server import start_offline_model
from trellis_offline_model.settings import OfflineModelSettings

log = get_logger(__name__)


def main() -> None:
    program = "trellis-offline-model"
    settings = load_settings(OfflineModelSettings, program)
    with startup_errors_exit(program):
        check_port(settings.host, settings.port, env_name(OfflineModelSettings, "port"))
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
