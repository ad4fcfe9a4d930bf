"""Build a gallery on a Ray cluster: ``ray job submit --working-dir . -- python jobs/index.py
...``.

The flags are those of ``hrem-ray index``; a sharded split (or ``--num-workers N``) is encoded
on Ray Data by the cluster's nodes, and the gallery written by the driver (``--out s3://...``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from hrem_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["index", *sys.argv[1:]])
