"""The main job (what `make demo` and `curvbound demo` run): train a smooth network with the
curvature penalty on the bundled 8×8 digits, compile its bound, certify the test split and compare
Lipschitz with curvature certificates. The steps are in curvbound/apps/demo.py.

Run: python examples/demo.py [--data mnist --data-dir PATH]
"""

import sys

from curvbound.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
