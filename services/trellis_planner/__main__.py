"""``python -m trellis_planner`` / ``trellis-planner``: the planner service as a process."""

from trellis.runtime.server import run_service
from trellis_planner.service import NAME, build
from trellis_planner.settings import PlannerSettings


def main() -> None:
    run_service("trellis-planner", NAME, PlannerSettings, build)


if __name__ == "__main__":
    main()
