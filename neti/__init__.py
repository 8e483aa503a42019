"""Neti: one flat, firewalled overlay network across networks that cannot route privately."""

__version__ = "2.0.0"
