"""The command line: one module per sub-command (cli.py: train and list), and the pipeline that puts training and the end-of-training evaluation together."""
