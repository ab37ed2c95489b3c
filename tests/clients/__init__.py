"""Helpers the gateway acceptance tests use to drive real and raw clients."""
