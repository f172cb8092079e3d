"""``python -m trellis_cache`` / ``trellis-cache``: the cache service as a process."""

from trellis.runtime.server import run_service
from trellis_cache.service import NAME, build
from trellis_cache.settings import CacheSettings


def main() -> None:
    run_service("trellis-cache", NAME, CacheSettings, build)


if __name__ == "__main__":
    main()
