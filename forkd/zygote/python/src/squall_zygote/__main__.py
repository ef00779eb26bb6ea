"""``python3 -m squall_zygote``: see :mod:`squall_zygote.cli`."""

import sys

from .cli import main

sys.exit(main())
