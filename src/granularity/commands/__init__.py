"""One module per CLI subcommand.

Each module defines ``add_parser(subparsers)``, which adds its subparser and
calls ``set_defaults(handler=run)``, and ``run(args) -> int``.
"""

COMMANDS = ("prepare", "classify", "segment", "predict", "study", "compare", "sweep")
