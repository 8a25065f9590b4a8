"""Shipped example configs; ``default.yaml`` is what ``trainer run`` with no arguments runs."""
