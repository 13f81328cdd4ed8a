"""DVC stage `features_index` (see dvc.yaml): a thin call of `saelab features-index`; the work is in src/saelab/browse."""

import sys

import _checkout  # noqa: F401  (first: this checkout's saelab)

from saelab.cli import main

if __name__ == "__main__":
    main(["features-index", *sys.argv[1:]])
