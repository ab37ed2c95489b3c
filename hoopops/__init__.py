"""hoopops: a PostgreSQL gateway for AI agents, with policy, masking, audit and a console."""

__version__ = "0.1.0"
