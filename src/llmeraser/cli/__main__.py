import sys

from llmeraser.cli import main

sys.exit(main())
