"""``python -m trellis_executor`` / ``trellis-executor``: the executor as a process."""

from trellis.runtime.server import run_service
from trellis_executor.service import NAME, build
from trellis_executor.settings import ExecutorSettings


def main() -> None:
    run_service("trellis-executor", NAME, ExecutorSettings, build)


if __name__ == "__main__":
    main()
