"""`python -m rewriter ARGS` = `rewrite ARGS` (the command line, rewriter/cli)."""
import sys

from rewriter.cli import main

sys.exit(main())
