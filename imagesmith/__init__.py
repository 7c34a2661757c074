"""The ``imagesmith`` command: the CLI, the local Prefect server it starts, and the offline defaults."""
