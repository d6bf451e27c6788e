"""Built-in datasets rendered on the fly (no downloads)."""
