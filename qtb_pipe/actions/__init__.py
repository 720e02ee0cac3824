"""One module per user action."""
