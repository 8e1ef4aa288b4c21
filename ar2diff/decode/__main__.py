"""`python -m ar2diff.decode --checkpoint DIR --prompt TEXT [...]`: see `ar2diff.decode.cli`."""

from ar2diff.decode.cli import main

raise SystemExit(main())
