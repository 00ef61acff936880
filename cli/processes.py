"""Child processes that do not outlive the command that started them.

`resnet triton serve`, `bench`, `loadtest` and `python -m training.reproduce run` start servers, Locust and
trainers, each in its own session (a Ctrl-C in the terminal reaches the parent only, which stops them in order).
Stopped by SIGTERM or Ctrl-C, the parent stops them; killed outright (SIGKILL, the OOM killer, a CI job's hard
limit), it could not: tritonserver kept its ports (the next `resnet triton serve` was refused: Address already in
use), Locust kept loading the service, trainers kept their GPU. The kernel can send a child a signal when its
parent dies (PR_SET_PDEATHSIG); util-linux's `setpriv --pdeathsig` sets it and execs the command under the same
pid. Popen's `preexec_fn` could set it too, but Python documents it as unsafe in a process with threads, which
these have. Kept free of heavy imports, like the rest of `cli`.
"""

from __future__ import annotations

import shutil

# not KILL: each child cleans up on SIGTERM (Triton its shared memory, a trainer checkpoints)
DEATH_SIGNAL = "TERM"


def ending_with_this_process(command: list[str]) -> list[str]:
    """`command` so that it gets SIGTERM when this process dies, however it dies; as it is where `setpriv` is
    missing. The kernel sends the signal when the *thread* that started the child ends, so start it from the
    thread that lives as long as the child should (each caller here: the main thread)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, f"--pdeathsig={DEATH_SIGNAL}", "--", *command] if setpriv else command
