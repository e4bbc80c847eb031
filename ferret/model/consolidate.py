"""Old path of `ferret.weights.consolidate`:
``python -m ferret.model.consolidate`` and ``import ferret.model.consolidate`` keep working."""

import sys

if __name__ == "__main__":
    from ferret.weights.cli import main

    sys.exit(main("consolidate", prog="python -m ferret.model.consolidate"))
else:
    from ferret.weights import consolidate as _module

    sys.modules[__name__] = _module
