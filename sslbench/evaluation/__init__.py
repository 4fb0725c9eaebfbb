"""The evaluation-protocol registry and its declarations (protocols.py) and frozen-feature extraction (features.py); the protocols themselves are plugins in sslbench.evals."""
