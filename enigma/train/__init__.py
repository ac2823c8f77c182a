"""The training system: Ray Train + DeepSpeed ZeRO pretraining and Ray Tune sweeps.

One concern per module:

- ``config``: ``TrainConfig`` and its pipeline (defaults < preset < JSON < flags < ``--set``)
- ``deepspeed_json``: DeepSpeed JSON loaded, checked key by key, ``"auto"`` filled
- ``plan``: what the driver hands every worker (``RunPlan``, ``RunSpec``)
- ``driver``: ``enigma train``: input checks, the ``TorchTrainer``, the final summary
- ``worker``: the loop each Ray Train worker runs (engine, step, evaluation)
- ``schedule``: the learning rate at each step
- ``checkpoint``: checkpoints written and restored, the exported model
- ``optimizer``: DeepSpeed's compiled Adam where it loads, torch's AdamW where it does not
- ``storage``: the run's lasting state on a local path or shared storage (``s3://``, ``gs://``)
- ``progress``: rank 0's TensorBoard and progress lines, the driver's printer
- ``sweep``: ``enigma tune``: the search space and the Tune driver
- ``sweep_trial``: one trial (a Train run inside a Tune trial)
- ``sweep_results``: a row per trial, the tables, the plot and ``best.json``
"""
