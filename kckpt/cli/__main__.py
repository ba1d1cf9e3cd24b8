"""``python -m kckpt.cli``: the `kckpt` command."""

import sys

from kckpt.cli import main

sys.exit(main())
