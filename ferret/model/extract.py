"""Old path of `ferret.weights.extract`:
``python -m ferret.model.extract`` and ``import ferret.model.extract`` keep working."""

import sys

if __name__ == "__main__":
    from ferret.weights.cli import main

    sys.exit(main("extract", prog="python -m ferret.model.extract"))
else:
    from ferret.weights import extract as _module

    sys.modules[__name__] = _module
