"""`rlae-eval`: the harness's own `lm_eval` command with `rlae` registered explicitly.

A fallback for environments where the start-up hook (`lm_eval_rlae.pth`) does not run, e.g. a
Python started with `-S`, or a site-packages that ignores .pth files.
"""

from lm_eval_rlae._startup import register


def main() -> None:
    import lm_eval.models  # noqa: F401  (built-in models first, see _startup)
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()
