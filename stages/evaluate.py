"""DVC stage `evaluate` (see dvc.yaml): a thin call of `saelab evaluate`; the work is in src/saelab."""

import sys

import _checkout  # noqa: F401  (first: this checkout's saelab)

from saelab.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
