"""Benchmarks: commands that print measured figures (never timed asserts in tests).

- ``model``: ``cratelm bench``, a bare training step per model variant (tokens/s, TFLOP/s, MFU);
- ``train``: ``cratelm bench --train`` / ``python -m cratelm.bench.train``, the full
  ``cratelm train`` step (DeepSpeed) against a plain loop;
- ``kernels``: ``cratelm bench-kernels``, attention / ISTA / LM-head loss side by side;
- ``data``: data preparation throughput.
"""
