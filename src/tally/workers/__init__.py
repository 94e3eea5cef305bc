"""`tally serve --workers N`: a primary process and N serving worker processes."""
