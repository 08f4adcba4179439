"""Command-line tools that work on result files only (they never load a model)."""
