"""DVC stage `summarize` (see dvc.yaml): a thin call of `saelab summarize`; the work is in src/saelab."""

import sys

from saelab.cli import main

if __name__ == "__main__":
    main(["summarize", *sys.argv[1:]])
