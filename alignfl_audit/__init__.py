"""alignfl-audit: CLI, config schema, orchestration and run directories."""
__version__ = "0.1.0"
