"""Time the quick-start experiment through fedkd against a plain PyTorch loop.

python simulations/benchmark.py [--repeats 3] [field=value ...]
"""

import sys

from fedkd.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
