"""Everything MLflow sees of a run: the store and its runs, the tag vocabulary, provenance, the
figures, and the child process that writes artifact files."""
