"""Pretrain EnigmaLM as a Ray job; the arguments are those of ``enigma train``.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/pretrain.py --preset tiny --data /abs/path/data/sanguo-128 --workers 2

Inside a job ``RAY_ADDRESS`` is set, so the run joins the cluster instead of starting one. Paths
must be absolute (or on shared storage): the job runs in a copy of the working directory.
"""

import sys

from enigma.train.driver import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
