"""The one-command demo: a tiny seeded model, a generated subject, workflow 1 through the real server."""
