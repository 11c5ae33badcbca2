"""The first module the `--nproc` forkserver imports (launch.processes.entry): the server dies with its launcher.

Each worker dies with its parent (launch.processes.lifeline), and a forked worker's parent is the
forkserver. The server would outlive a launcher killed with -9: every worker holds the pipe whose end
tells the server that its clients are gone. So the server asks the kernel for the same signal on its own
parent's death, and `kill -9` of the launcher takes the server, and with it every worker, down.
"""

from launch.processes import lifeline

lifeline.die_with_parent()  # LAUNCH_PARENT_PID: the launcher, set before the server started
