"""``python -m trellis_toolgateway`` / ``trellis-toolgateway``: the gateway as a process."""

from trellis.runtime.server import run_service
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings


def main() -> None:
    run_service("trellis-toolgateway", NAME, GatewaySettings, build)


if __name__ == "__main__":
    main()
