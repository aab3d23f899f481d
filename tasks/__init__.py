"""The example application's tasks, found by `dbtasks worker` (see README)."""
