"""Entry script for `ray job submit`: `python jobs/compare.py --config my.yaml --seeds 5 --against full`.

The same as `incr-ray compare ...`: the config, its baselines and grid values on several seeds as Ray
Tune trials on the cluster, paired by seed, reported in <storage.path>/<run.name>/compare.md. Under
`ray job submit`, RAY_ADDRESS points this process at the cluster.
"""

import sys

from incr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
