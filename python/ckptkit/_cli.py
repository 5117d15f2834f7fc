"""The ``migrate`` console script: the same command line as the Rust binary."""

import sys

from ckptkit._ckptkit import _cli_main


def main() -> None:
    """Run ``migrate`` with ``sys.argv`` and exit with its code (130 on Ctrl-C)."""
    try:
        code = _cli_main(["migrate", *sys.argv[1:]])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
