"""The `med3dfm` subcommands, one module each: `add_parser(subparsers)` adds its arguments, `run(args,
progress)` does the work and prints the summary line. `options` holds what they share; `cli.py` puts
them together (and adds `models` from `registry.cli`). Parsing imports nothing heavy: each `run`
imports the code it needs.
"""
