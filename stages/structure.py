"""DVC stage `structure` (see dvc.yaml): a thin call of `saelab structure`; the work is in src/saelab."""

import sys

import _checkout  # noqa: F401  (first: this checkout's saelab)

from saelab.cli import main

if __name__ == "__main__":
    main(["structure", *sys.argv[1:]])
