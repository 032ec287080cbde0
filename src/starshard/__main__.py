"""``python -m starshard``: the same as the ``starshard`` command."""
import sys

from .cli import main

sys.exit(main())
