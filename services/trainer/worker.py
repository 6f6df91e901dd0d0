"""A trainer job's process: ``python -m services.trainer.worker JOB_ID``, under torchrun when the job
has several (``distributed.processes`` per node, ``distributed.nodes`` pods on Kubernetes).

The trainer service starts it (services/trainer/launchers.py) with its own settings in the
environment (``RLHF_TRAINER_*``): the database that holds the job's record, the registry, the
other services' addresses and the credentials to call them. Every rank runs the job's recipe;
rank 0 reports to the record and writes the outcome. Exit status: 0 done, 75 interrupted by
SIGTERM after writing a checkpoint (the trainer resumes it), 1 otherwise (under torchrun a rank
that exits non-zero ends the others).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("rlhf.trainer.worker")


def main(argv: list[str] | None = None) -> int:
    from rlhf.runtime.threads import prepare_process

    # before torch is imported: the job's intra-op threads (the trainer's torch_threads setting)
    threads = prepare_process(int(os.environ.get("RLHF_TRAINER_TORCH_THREADS") or 0))
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m services.trainer.worker JOB_ID", file=sys.stderr)
        return 2
    job_id = args[0]

    from rlhf import distributed
    from rlhf.checkpoint import install_preemption_handler
    from rlhf.runtime.logs import configure_logging
    from rlhf.runtime.settings import load_settings
    from rlhf.runtime.threads import use_model_threads
    from rlhf.storage.db import make_engine
    from rlhf.storage.jobs import JobStore
    from services.trainer.service import NAME, Settings

    settings = load_settings(Settings, NAME)
    configure_logging(f"{NAME}-job", settings.log_level)
    use_model_threads(threads)
    install_preemption_handler()
    engine = make_engine(settings.database_url, statement_timeout_s=settings.statement_timeout_seconds)
    try:
        world = distributed.setup(settings.device)
        return run(JobStore(engine), job_id, settings, world.main)
    finally:
        distributed.shutdown()
        engine.dispose()


def run(store, job_id: str, settings, main: bool) -> int:
    """Run the job's recipe; rank 0 records how it ended. Returns the process's exit status."""
    from pathlib import Path

    import grpc

    from rlhf.checkpoint import EXIT_INTERRUPTED, Interrupted, Stopped
    from rlhf.errors import RLHFError
    from rlhf.storage.jobs import CANCELLED, FAILED, PENDING, SUCCEEDED
    from services.trainer import runs
    from services.trainer.jobs import JobCancelled, JobContext
    from services.trainer.service import job_config, peers_for

    record = store.get(job_id)
    ctx = JobContext(store, job_id, main=main)

    def outcome(**fields) -> None:
        if main:
            store.report(job_id, only_if_active=True, **fields)

    try:
        cfg = job_config(record.kind, record.config)
        result = runs.run_job(record.kind, ctx, peers_for(settings, store), cfg, Path(record.checkpoint_dir))
        outcome(status=SUCCEEDED, message="done", progress=1.0, metrics=result)
        return 0
    except Interrupted as e:
        outcome(status=PENDING, runner=None,
                message=f"interrupted at step {e.step} with a checkpoint; resumes when the trainer starts it again")
        return EXIT_INTERRUPTED
    except (JobCancelled, Stopped):
        outcome(status=CANCELLED, message="cancelled")
    except RLHFError as e:
        outcome(status=FAILED, message=str(e))
    except grpc.RpcError as e:  # a peer service refused: its status says why
        outcome(status=FAILED, message=f"a call to another service failed: {e.code().name}: {e.details()}")
    except Exception as e:  # noqa: BLE001 - a job's failure is its status
        log.exception("job failed", extra={"fields": {"job_id": job_id, "kind": record.kind}})
        outcome(status=FAILED, message=f"{type(e).__name__}: {e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
