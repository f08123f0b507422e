"""The artifact files passed between stages, each with a ``format_version`` attribute."""
