"""Prefect flows: wire tasks together and choose task runners. No compute here."""
