"""`python -m trainer [overrides]`: the Hydra entry point and nothing else (work is in app.py;
a sweep's jobs, `-m`, in sweep.py)."""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out


def _stopped_while_loading(signum, frame) -> None:
    """Ctrl-C or SIGTERM in the ~0.3 s Python takes to import the modules below: nothing has
    been written by this process yet (main() installs the handlers that follow)."""
    run = next((a[len("hydra.run.dir=") :] for a in sys.argv if a.startswith("hydra.run.dir=")), "")
    ckpts = os.path.join(run, "checkpoints") if run else ""
    saved = os.path.isdir(ckpts) and any(n.endswith(".manifest.json") for n in os.listdir(ckpts))
    what = "its checkpoints are intact; rerun the command to resume" if saved else "rerun it"
    name = signal.Signals(signum).name
    os.write(2, f"\ninterrupted ({name}) while starting, nothing written; {what}\n".encode())
    os._exit(3 if saved else 4)  # the exit codes of runinfo.interrupted_message


if not any(a in ("-m", "--multirun", "hydra.mode=MULTIRUN") for a in sys.argv[1:]):
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _stopped_while_loading)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402

from trainer import signals, startup  # noqa: E402
from trainer.config import CONF_DIR, register_schemas  # noqa: E402
from trainer.sweep import jobs as sweep  # noqa: E402  (registers the job_dirname resolver)
from trainer.sweep import runinfo  # noqa: E402

register_schemas()
_task_started = False
# Hydra's flags that print and exit without running the task: no TensorFlow to load
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion"}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _entry(cfg) -> float | None:
    global _task_started
    _task_started = True
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        from trainer.sweep import jobs as sweep

        return sweep.run_job(cfg, hc.runtime.output_dir)
    from trainer import app

    code = app.run(cfg, hc.runtime.output_dir, last_in_process=True)
    if code:
        sys.exit(code)
    return None


def main() -> None:
    single = not any(a in ("-m", "--multirun", "hydra.mode=MULTIRUN") for a in sys.argv[1:])
    if single:
        signals.interrupt_outside_the_loop()  # Ctrl-C or SIGTERM during start-up ends it
    try:
        _main()
    except SystemExit as e:
        _leave(e.code, single)
        raise
    except KeyboardInterrupt as e:  # before Hydra made the run (app.py reports those after)
        if not single:
            raise
        run_dir = next(
            (a.partition("=")[2] for a in sys.argv if a.startswith("hydra.run.dir=")), None
        )
        code, message = runinfo.interrupted_message(
            run_dir, signals.interrupted_by(e), "Rerun the same command to resume."
        )
        print(f"\n{message}", file=sys.stderr)
        _leave(code, single)
        sys.exit(code)
    _leave(0, single)


def _leave(code, single: bool) -> None:
    """A single run ends here, with the code it reported, not in the interpreter's teardown
    (~1 s of TensorFlow's clean-up after the summary). There, a signal that came after the
    outcome was decided killed the process (exit -2 after a completed run, and after a run that
    had printed "nothing to resume", on a loaded machine), and a tf.data thread still
    prefetching rows of a data=custom source through Python held the clean-up forever (2 exits
    in 5 after a bad row; a sweep that read such a source ends here too). Every file of the
    run is closed by now. The atexit handlers still run, with further signals ignored (they
    remove autograph's generated files and the preemption scratch dir from the temp dir); the
    logs are flushed last."""
    source = sys.modules.get("trainer.data.source")
    if not single and (source is None or not source.SourceData.opened):
        return
    import atexit
    import logging

    signals.ignore_stops()  # the exit code is decided; a late signal is ignored
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what the interpreter prints for sys.exit("message")
    atexit._run_exitfuncs()  # what os._exit skips: the clean-up others registered
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def _main() -> None:
    from trainer.preflight import check

    problem = check(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        info = _INFO_FLAGS & {a.partition("=")[0] for a in sys.argv[1:]}  # (--cfg=job too)
        if not startup.debug_asked(sys.argv[1:]) and not info:
            startup.load_tensorflow_quietly()  # its C++ start-up lines are not ours to show
        _entry()
    except signals.SweepInterrupted:  # a signal stopped the sweep: the report, exit 3
        sys.exit(sweep.finish(stopped=True))
    except SystemExit as e:
        # Hydra exits 1 when composing the config fails (unknown option or key, wrong type):
        # that is bad input, exit code 2 by our contract.
        if not _task_started and not sweep.started() and e.code not in (0, None):
            sys.exit(2)
        code = sweep.finish()  # a sweep that Hydra ended still reports the jobs it ran
        sys.exit(code if code else e.code)
    code = sweep.finish()  # a sweep: the table, sweep.csv/json; None for a single run
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
