"""``python -m ktinject``: the same command line as the ``ktinject`` script."""

import sys

from ktinject.cli import main

sys.exit(main())
