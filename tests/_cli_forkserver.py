"""Run many ``python -m alignfl_audit.cli ...`` invocations cheaply (used by test_cli.py).

Every CLI process spends seconds importing torch, scikit-learn and matplotlib before it can even
reject a config. This helper pays that once: it imports the CLI's modules, then forks one child per
case; each child redirects its stdout/stderr (file descriptors 1 and 2) to files and executes the
``alignfl_audit.cli`` module as ``__main__`` exactly as ``python -m`` does, then exits with the
status the interpreter would give (``SystemExit`` code, or 1 after printing the traceback of an
uncaught exception).

usage: python _cli_forkserver.py CASES.json   (a list of {"argv": [...], "stdout": p, "stderr": p})
prints a JSON list of exit codes.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import traceback


def _child(case: dict) -> None:
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    code = 0
    try:
        sys.modules.pop("alignfl_audit.cli", None)
        sys.argv = ["-m", *case["argv"]]  # as under `python -m`, before runpy fills in argv[0]
        runpy.run_module("alignfl_audit.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    # warm the import cache with everything the CLI imports on its way to an error (but not the CLI
    # module itself: `python -m` executes it fresh, and so does each child)
    import alignfl_audit.config  # noqa: F401
    import alignfl_audit.orchestrate  # noqa: F401

    codes = []
    for case in cases:
        pid = os.fork()
        if pid == 0:
            _child(case)
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    print(json.dumps(codes))


if __name__ == "__main__":
    main()
