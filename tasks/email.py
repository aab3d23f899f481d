"""An on-demand task: runs only when enqueued, for example by examples/app.py."""

from dbtasks import JobContext, task


@task(name="sendWelcomeEmail", max_attempts=3, timeout=30)
def send_welcome_email(params: dict, context: JobContext) -> None:
    """Pretend to email a new user; the application enqueues it on sign-up."""
    context.logger.info("welcome email to %s", params["email"])
