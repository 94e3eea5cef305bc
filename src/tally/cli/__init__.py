"""The `tally` command line: the server and every admin task."""
