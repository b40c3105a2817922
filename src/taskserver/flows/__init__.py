"""Prefect flows: thin wrappers over the library modules, one module per task type."""
