"""Fine-tune EnigmaLM as a Ray job; the arguments are those of ``enigma finetune``.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/finetune.py --model /abs/path/runs/demo/model \\
        --data /abs/path/chat.jsonl --output-dir /abs/path/runs/chat --workers 2

Inside a job ``RAY_ADDRESS`` is set, so the run joins the cluster. The job runs in a temporary copy
of the working directory: every path must be absolute (or on shared storage).
"""

import sys

from enigma.train.finetune import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
