import sys

from ktinject.cli import main

sys.exit(main())
