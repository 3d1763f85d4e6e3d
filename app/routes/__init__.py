"""Blueprints: the DashScope-compatible routes and the operational ones."""
