"""`quiver-index`: declared now so the console script exists; FAISS index bundles (issue #5) lands in its own issue."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("quiver-index: not available yet: FAISS index bundles come with issue #5", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
