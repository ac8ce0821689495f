"""Entry script for `ray job submit`: `python jobs/train.py --config jobs/X.yaml [--set KEY=VALUE ...]`.

The same as `incr-ray train ...`. Under `ray job submit`, Ray sets RAY_ADDRESS for this process, so
the run attaches to the cluster instead of starting a local Ray.
"""

import sys

from incr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
