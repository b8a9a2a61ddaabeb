"""Prefect flows composed from tasks: training, batch scoring and the nightly flow."""
