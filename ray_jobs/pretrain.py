"""Pretrain EnigmaLM as a Ray job; the arguments are those of ``enigma train``.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/pretrain.py --preset tiny --data /abs/path/data/sanguo-128 --workers 2 \\
        --storage-path s3://bucket/runs/tiny

Inside a job ``RAY_ADDRESS`` is set, so the run joins the cluster instead of starting one. The job
runs in a temporary copy of the working directory, so the default output directory is
``~/enigma-runs/PRESET`` (``ENIGMA_RUNS_DIR`` moves it), not ``runs/`` inside that copy; on more
than one machine give ``--storage-path`` (shared storage every node reaches), where checkpoints,
TensorBoard events and the model go. Other paths must be absolute.
"""

import os
import sys

from enigma.train.driver import main

if __name__ == "__main__":
    os.environ.setdefault("ENIGMA_RUNS_DIR", os.path.expanduser("~/enigma-runs"))
    sys.exit(main(sys.argv[1:]))
