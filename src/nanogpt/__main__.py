"""`python -m nanogpt <command>`: the same entry point as the `nanogpt` console script."""

import sys

from nanogpt.cli import main

sys.exit(main())
