"""Old path of `ferret.weights.apply_delta`:
``python -m ferret.model.apply_delta`` and ``import ferret.model.apply_delta`` keep working."""

import sys

if __name__ == "__main__":
    from ferret.weights.cli import main

    sys.exit(main("apply-delta", prog="python -m ferret.model.apply_delta"))
else:
    from ferret.weights import apply_delta as _module

    sys.modules[__name__] = _module
