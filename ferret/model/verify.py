"""Old path of `ferret.weights.verify`:
``python -m ferret.model.verify`` and ``import ferret.model.verify`` keep working."""

import sys

if __name__ == "__main__":
    from ferret.weights.cli import main

    sys.exit(main("verify", prog="python -m ferret.model.verify"))
else:
    from ferret.weights import verify as _module

    sys.modules[__name__] = _module
