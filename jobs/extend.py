"""Entry script for `ray job submit`: `python jobs/extend.py --run STORAGE/RUN_NAME --data NEW_FILE`.

The same as `incr-ray extend ...`: one more generation trained on the new data, with the run's last
model as the teacher. Under `ray job submit`, RAY_ADDRESS points this process at the cluster.
"""

import sys

from incr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["extend", *sys.argv[1:]]))
