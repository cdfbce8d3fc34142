"""`python -m tbptt_jax.cli`: the `tbptt-jax` command."""

import sys

from tbptt_jax.cli import main

sys.exit(main())
