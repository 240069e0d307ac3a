"""python -m dedupd"""

import sys

from dedupd.cli import main

sys.exit(main())
