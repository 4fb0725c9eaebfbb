"""The entry point of the toy methods (``sslbench.methods`` group) for subprocesses of the tests."""

from _toy_methods import register

register()
