"""Old path of `ferret.weights.make_delta`:
``python -m ferret.model.make_delta`` and ``import ferret.model.make_delta`` keep working."""

import sys

if __name__ == "__main__":
    from ferret.weights.cli import main

    sys.exit(main("make-delta", prog="python -m ferret.model.make_delta"))
else:
    from ferret.weights import make_delta as _module

    sys.modules[__name__] = _module
