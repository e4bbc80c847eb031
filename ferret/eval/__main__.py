"""``python -m ferret.eval <benchmark> <subcommand> ...`` (see ferret/eval/__init__.py)."""

import sys

from ferret.eval import main

sys.exit(main())
