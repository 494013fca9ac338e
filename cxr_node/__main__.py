"""`python -m cxr_node` is the `cxr-node` command."""

import sys

from cxr_node.cli import main

sys.exit(main())
