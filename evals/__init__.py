"""sslbench.evals"""
