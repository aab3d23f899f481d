"""`python -m dbtasks` runs the command line."""

from dbtasks.cli import main

main()
