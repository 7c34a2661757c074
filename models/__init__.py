"""PyTorch modules, losses, training loops and schedules (no Prefect imports here)."""
