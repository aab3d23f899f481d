"""A periodic `all` task: every live node reports itself."""

import os
import socket

from dbtasks import JobContext, task


@task(
    name="reportNode",
    description="Every live node logs who it is, every ten seconds",
    scope="all",
    frequency=10,
)
def report_node(params: dict, context: JobContext) -> dict:
    context.logger.info(
        "node %s is alive (host %s, pid %d)",
        context.node,
        socket.gethostname(),
        os.getpid(),
    )
    return {"node": context.node}
