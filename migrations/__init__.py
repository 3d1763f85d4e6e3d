"""The gateway's schema migrations (Alembic): env.py, script.py.mako and versions/."""
