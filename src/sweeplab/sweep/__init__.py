"""Multiruns: the parent run and its summary, how jobs treat their failures, search spaces."""
