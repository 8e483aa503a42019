"""zkproxy."""
