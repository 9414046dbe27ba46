"""`python -m rewriter.cli ARGS` = `rewrite ARGS`."""
import sys

from rewriter.cli import main

sys.exit(main())
