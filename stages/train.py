"""DVC stage `train` (see dvc.yaml): a thin call of `saelab train`; the work is in src/saelab."""

import sys

import _checkout  # noqa: F401  (first: this checkout's saelab)

from saelab.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
