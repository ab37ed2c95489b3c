"""The one-command demo: embedded PostgreSQL, fake PII, agents, gateway and console."""
