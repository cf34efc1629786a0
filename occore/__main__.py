"""``python -m occore``: the command line (see :mod:`occore.cli`)."""
import sys

from .cli import main

sys.exit(main())
