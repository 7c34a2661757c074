"""Prefect tasks: thin @task wrappers around the plain functions that do the work."""
