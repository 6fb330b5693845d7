"""``python -m demo``: crawl → curate → train → evaluate → report (see demo.run)."""
import sys

from demo.run import main

sys.exit(main())
