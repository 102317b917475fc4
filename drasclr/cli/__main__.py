"""``python -m drasclr.cli``: the same as the ``drasclr`` command (used by torchrun)."""
import sys

from drasclr.cli import main

sys.exit(main())
