"""MLflow conventions: tracking URI, run context, tags, artifacts and search."""
