import sys

from rawpunch.cli import main

sys.exit(main())
