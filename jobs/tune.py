"""Sweep HREM on a Ray cluster: ``ray job submit --working-dir . -- python jobs/tune.py ...``.

The flags are those of ``hrem-ray tune``; the last line printed is ``best checkpoint: <path>``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from hrem_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]])
