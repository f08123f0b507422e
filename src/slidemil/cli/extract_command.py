"""``slidemil extract``: being written (this module registers the command on the app)."""
