"""Where the work lands, the paths it reads must be there: each training worker and scoring
actor checks the local paths it is about to read before it starts.

The driver's own check (``incr_ray.run.preflight.check_shared_paths``) asks every node alive when
the run starts; an autoscaling cluster starts with the head alone and adds the GPU nodes later, so
only the process on the new node can tell. A path it cannot see fails there in one line
(``ConfigError``, which reaches the console as itself), not deep inside a model load.
"""

from __future__ import annotations

import os
import socket

from ..config import ConfigError
from ..storage import is_remote

FIX = "on a multi-node cluster put it on storage every node reaches (an NFS mount on all nodes, or s3://)"


def require_visible(paths: dict[str, str], who: str) -> None:
    """Raise a one-line ConfigError naming the first local path of ``paths`` (``{setting: path}``;
    storage URIs are skipped: each node reads those itself) that this process cannot see."""
    for setting, path in paths.items():
        if path and not is_remote(path) and not os.path.exists(path):
            raise ConfigError(f"{setting} {path!r} is not visible on node {socket.gethostname()}, where {who} "
                              f"runs; {FIX}")
