import sys

from imagesmith.cli import main

sys.exit(main())
