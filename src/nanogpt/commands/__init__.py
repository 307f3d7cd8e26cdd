"""One module per CLI command that is more than a call into a package: its flags, turning flags into
configs, the backend choice (`--backend torch|mlx`: the one place the layer rules allow it) and printing.
Only `nanogpt.cli` reaches this package, by module name when the command runs; nothing else imports it.

    nanogpt train --preset tiny --data data/builtin --out runs/tiny   # nanogpt.commands.train.main
"""
