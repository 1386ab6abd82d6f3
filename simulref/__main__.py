"""``python -m simulref``: the same as the ``simulref`` command."""

import sys

from simulref.cli import main

sys.exit(main())
