"""The command line: one module per command, named as the command (`run`, `gen`, `verify`,
`bench`, `info`, `sweep`, `plot`), each with its `add_parser` and `cmd_<name>`; `cli` builds
the parser from them and dispatches; `jobs` reads job files and `launch` starts the ranks for
`sweep` (and holds `on_root`, for commands that run on rank 0 only)."""
