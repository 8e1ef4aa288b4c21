import sys

from ar2diff.plan.cli import main

sys.exit(main())
