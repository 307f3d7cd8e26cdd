"""One module per CLI command that is more than a call into a package: flags, backend dispatch, printing.
Nothing in the library imports this package.
"""
