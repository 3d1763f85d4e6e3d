"""The migrations, one module each; Alembic loads them by path (their names start with digits)."""
