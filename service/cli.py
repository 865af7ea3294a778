"""`quiver-serve`: declared now so the console script exists; the FastAPI service (issue #6) lands in its own issue."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("quiver-serve: not available yet: the FastAPI service comes with issue #6", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
