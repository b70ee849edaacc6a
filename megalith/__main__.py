import sys

from megalith.cli import main

sys.exit(main())
