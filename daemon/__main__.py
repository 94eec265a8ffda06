"""`python -m daemon` is the `gemini-batchd` command."""

import sys

from .cli import main

sys.exit(main())
