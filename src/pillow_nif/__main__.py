"""`python -m pillow_nif ...`: the `nif` command, where pip's scripts folder is not on PATH."""

import sys

from .cli import main

sys.exit(main())
