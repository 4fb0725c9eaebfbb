"""sslbench.methods"""
