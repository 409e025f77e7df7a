import sys

from raydpo.cli import main

sys.exit(main())
