"""python -m dedupd.cli (as before the CLI became a package; `python -m dedupd` is the same)."""

import sys

from dedupd.cli import main

sys.exit(main())
