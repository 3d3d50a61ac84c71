"""`python -m llama2rnn`: the same as the `llama2rnn` command."""

import sys

from .cli import main

sys.exit(main())
