"""sslbench: a pluggable benchmark suite for self-supervised image representation learning."""

__version__ = "0.1.0"
