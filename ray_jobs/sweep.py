"""Run a Ray Tune sweep as a Ray job; the arguments are those of ``enigma tune``.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/sweep.py --preset tiny --data /abs/path/data/sanguo-128 \\
        --output-dir /abs/path/runs/sweep --max-steps 60 --seeds 2

Paths must be absolute (or on shared storage): the job runs in a copy of the working directory.
Submitting the same command again after the driver died restores the sweep.
"""

import sys

from enigma.train.sweep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
