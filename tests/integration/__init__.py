"""Tests against real servers (PostgreSQL, S3, MLflow) and static checks of the compose stack."""
