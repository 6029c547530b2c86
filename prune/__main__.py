import sys

from prune.cli import main

sys.exit(main())
