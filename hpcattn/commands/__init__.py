"""The command line: `cli` parses arguments and calls one module per command, named as the
command (`run`, `gen`, `verify`, `bench`, `info`, `sweep`, `plot`); `jobs` reads job files and
`launch` starts the ranks for `sweep`."""
