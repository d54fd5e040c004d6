import os

from ratelab.cli.main import main

if __name__ == "__main__":
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun: skip the interpreter's teardown of gloo threads, which can abort a finished run
        # (ratelab.core.dist.exit_process).
        from ratelab.core.dist import cleanup, exit_process

        cleanup()
        exit_process(rc)
    raise SystemExit(rc)
