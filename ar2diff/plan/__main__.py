import sys

from ar2diff.cli_errors import USER_ERRORS, hydra_errors_in_one_line, report
from ar2diff.plan.cli import main

with hydra_errors_in_one_line("ar2diff.plan"):  # an unknown key, a missing option, a malformed override
    try:
        code = main()
    except USER_ERRORS as err:  # a config that cannot be planned (no model.path or model.config, a bad size)
        code = report("ar2diff.plan", err)
sys.exit(code)
