import sys

from service.witness.cli import main

sys.exit(main())
