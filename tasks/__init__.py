"""Prefect tasks: thin wrappers that read/write Parquet, call convmf_core and log to MLflow."""
