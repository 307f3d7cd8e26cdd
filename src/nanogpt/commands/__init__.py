"""One module per CLI command (flags, backend dispatch, printing), and `options.py`, the flags they share.
Nothing in the library imports this package; `nanogpt.cli` imports a command's module when it runs.
"""
