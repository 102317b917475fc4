"""``python -m drasclr``: the same as the ``drasclr`` command."""
import sys

from drasclr.cli import main

sys.exit(main())
