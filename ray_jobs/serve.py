"""Serve a saved model as a Ray job; the arguments are those of ``enigma serve``.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/serve.py /abs/path/runs/chat/model --host 0.0.0.0 --port 8000

Inside a job ``RAY_ADDRESS`` is set, so the application is deployed onto the running cluster and
stays until the job is stopped (``ray job stop``), which deletes it. The model's path must be one
every replica's node can read. ``serve deploy ray_jobs/serve_config.yaml`` deploys the same
application from a config file instead.
"""

import sys

from enigma.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
