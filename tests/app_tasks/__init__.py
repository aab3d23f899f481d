"""Tasks of the test application (no periodic ones; see periodic_tasks)."""
