"""Command-line entry points of `trl-laser`: each module has `make_parser(subparsers=None)` and `main(args)`."""
