"""The seed's sayHello: a periodic `any` task, run by one node every second."""

from dbtasks import JobContext, task


@task(
    name="sayHello",
    description="I am a demo task which will be run only on one node",
    scope="any",
    frequency=1,
)
def say_hello(params: dict, context: JobContext) -> None:
    context.logger.info(
        "----- Hi there! ----- (job %s on %s)", context.job_id, context.node
    )
