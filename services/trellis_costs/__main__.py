"""``python -m trellis_costs`` / ``trellis-costs``: the cost-accounting service as a process."""

from trellis.runtime.server import run_service
from trellis_costs.service import NAME, build
from trellis_costs.settings import CostsSettings


def main() -> None:
    run_service("trellis-costs", NAME, CostsSettings, build)


if __name__ == "__main__":
    main()
