"""``python -m lorank``: the ``lorank`` command line."""

import sys

from lorank.cli import main

if __name__ == "__main__":
    sys.exit(main())
