"""The trainer: setup (run_setup.py), the loop (trainer.py), its observers (callbacks.py, tracking.py, report.py), the data stream (batches.py), the gradient cache and checkpoints."""
