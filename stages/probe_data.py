"""DVC stage `probe_data` (see dvc.yaml): a thin call of `saelab probe-data`; the work is in src/saelab."""

import sys

import _checkout  # noqa: F401  (first: this checkout's saelab)

from saelab.cli import main

if __name__ == "__main__":
    main(["probe-data", *sys.argv[1:]])
