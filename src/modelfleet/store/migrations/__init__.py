"""Alembic migrations for the SQL store. Run through ``SQLStore.migrate()``, never by hand."""
