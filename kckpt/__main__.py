"""``python -m kckpt``: the `kckpt` command (see `kckpt.cli`)."""

import sys

from kckpt.cli import main

sys.exit(main())
