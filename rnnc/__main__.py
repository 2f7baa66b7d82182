"""`python -m rnnc` is the `rnnc` command."""
from .cli import main

raise SystemExit(main())
