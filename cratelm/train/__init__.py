"""Training through DeepSpeed: the engine (engine.py), the pipeline adapter (pipeline.py),
the loop (trainer.py), checkpoints (checkpoint.py), the LR schedule (schedule.py), logging
(metrics.py) and the export of a consolidated model (export.py).

Nothing here is imported by the model code; ``cratelm train`` / ``cratelm export`` import
these modules lazily (DeepSpeed is a heavy import).
"""
