import sys

from kiln.conformance.runner import main

sys.exit(main())
