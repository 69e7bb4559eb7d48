"""``python -m curvbound``: the command line of ``apps/cli.py`` (also the ``curvbound`` script)."""

import sys

from .apps.cli import main

sys.exit(main())
