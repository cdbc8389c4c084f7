"""The reference app: the seed protocol as the original Django Channels dashboard app served it."""
