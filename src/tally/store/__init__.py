"""The Redis side of Tally: key layout, Lua scripts and the store facade."""
