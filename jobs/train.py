"""Train HREM on a Ray cluster: ``ray job submit --working-dir . -- python jobs/train.py ...``.

Also runs as ``python jobs/train.py ...`` (joins RAY_ADDRESS or starts a local Ray). The
flags are those of ``hrem-ray train``; the last line printed is ``best checkpoint: <path>``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from hrem_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
