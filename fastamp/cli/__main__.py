"""``python -m fastamp.cli``: the ``fastamp`` command."""

import sys

from . import main

sys.exit(main())
