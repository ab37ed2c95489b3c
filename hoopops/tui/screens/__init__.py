"""The console's screens and modals, one per module."""
