import sys

from neurocat.cli import main

sys.exit(main())
